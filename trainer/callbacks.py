"""Callbacks: single-file export, EMA of the trainable weights, sample grids, samples/s.

All of them act on ``pl_module.core.ssr`` (the trainable ``ssr.SSRWeights``). Under FSDP
the trainable weights are gathered on every rank before they are read (a collective, so
every rank runs these hooks); files are written by rank 0 only.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Dict, Iterator, List, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ssr.weights import EXPORT_FORMATS, export_ssr_weights

log = logging.getLogger(__name__)


def output_dir(trainer: pl.Trainer, name: str) -> str:
    """<log dir>/<name> (the first logger's version folder, else default_root_dir).
    Call on every rank: ``trainer.log_dir`` broadcasts rank 0's folder."""
    base = trainer.log_dir or trainer.default_root_dir
    return os.path.join(base, name)


def _is_fsdp(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


@contextlib.contextmanager
def full_parameters(trainer: pl.Trainer, recurse: bool = True) -> Iterator[None]:
    """Within the block, parameters are whole on every rank (FSDP: gathered, not written
    back; other strategies: nothing to do). Every rank must enter it."""
    if not _is_fsdp(trainer):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, recurse=recurse, writeback=False):
        yield


def find_callback(trainer: pl.Trainer, kind: type) -> Optional[Callback]:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


# ---------------------------------------------------------------------------------- EMA

class EMA(Callback):
    """Exponential moving average of the trainable SSR weights (fp32, on the device).

    After every optimizer step: ema = d * ema + (1 - d) * weights, with the warm-up
    d = min(decay, (1 + n) / (10 + n)) at update n, so early averages do not drag the
    random start along. Validation, sample grids and exports use the EMA weights; Lightning
    checkpoints keep both (raw weights in the state dict, the average in this callback's
    state). Not available with FSDP (its parameters are sharded between steps).
    """

    def __init__(self, decay: Optional[float] = None):
        """
        Args:
            decay: EMA decay per optimizer step, e.g. 0.9999; null (default) disables EMA.
        """
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {}
        self.updates = 0
        self._last_step = -1
        self._backup: Optional[Dict[str, torch.Tensor]] = None

    @property
    def enabled(self) -> bool:
        return self.decay is not None

    def _parameters(self, pl_module: pl.LightningModule) -> Dict[str, torch.nn.Parameter]:
        """The trainable parameters by name (looked up once: walking ~1500 frozen ones every
        step costs time)."""
        if getattr(self, "_params_of", None) is not pl_module:
            self._params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
            self._params_of = pl_module
        return self._params

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if _is_fsdp(trainer):
            raise ValueError("EMA is not supported with FSDP; use DDP (the trainable part is ~26 M parameters) "
                             "or set ema.decay: null")
        params = self._parameters(pl_module)
        if self.shadow:  # restored from a checkpoint
            missing = set(params) - set(self.shadow)
            if missing:
                raise KeyError(f"EMA state from the checkpoint lacks {sorted(missing)[:3]}")
            self.shadow = {n: self.shadow[n].to(params[n].device) for n in params}
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.enabled or trainer.global_step == self._last_step:
            return  # no optimizer step happened (gradient accumulation)
        self._last_step = trainer.global_step
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self._parameters(pl_module).items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def averaged(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Within the block the module holds the EMA weights (no-op when disabled or already)."""
        if not self.enabled or not self.shadow or self._backup is not None:
            yield
            return
        self._swap_in(pl_module)
        try:
            yield
        finally:
            self._swap_out(pl_module)

    @torch.no_grad()
    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        params = self._parameters(pl_module)
        self._backup = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(self.shadow[n])

    @torch.no_grad()
    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        for n, p in self._parameters(pl_module).items():
            p.copy_(self._backup[n])
        self._backup = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.enabled and self.shadow and self._backup is None:
            self._swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._backup is not None:
            self._swap_out(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        if self._backup is not None:  # saved while swapped in: store the raw weights as the weights
            checkpoint["state_dict"].update({n: t.clone() for n, t in self._backup.items()})

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self.enabled:
            self.shadow = dict(state_dict.get("shadow", {}))
            self.updates = int(state_dict.get("updates", 0))


# ---------------------------------------------------------------------------------- export

class SSRExport(Callback):
    """Writes the trainable weights every ``every_n_steps`` optimizer steps and at the end of
    training: our single .safetensors (what the WebUI extension loads, with metadata: base
    model, steps, data, settings) and, if asked, the official .bin pair and the safetensors
    re-export pair (each pair in its own folder, under the names other tools look for).
    With EMA on, the EMA weights are exported."""

    def __init__(self, every_n_steps: int = 5000, dirpath: Optional[str] = None, prefix: str = "ssr",
                 half: bool = False, export_on_train_end: bool = True, formats: Optional[List[str]] = None):
        """
        Args:
            every_n_steps: Export every this-many optimizer steps (0: only at the end).
            dirpath: Output folder (default: <log dir>/export).
            prefix: File names are <prefix>-step<N>.safetensors (and <prefix>-last.safetensors).
            half: Store fp16 tensors (half the size; loaded as fp32).
            export_on_train_end: Also export when training ends (<prefix>-last.safetensors).
            formats: What to write each time, any of "single" (<prefix>-step<N>.safetensors),
                "official" (folder <prefix>-step<N>-official/ with pytorch_model.bin +
                pytorch_model_1.bin, the authors' layout) and "reexport" (folder
                <prefix>-step<N>-reexport/ with ssr_aligner.safetensors +
                ssr_attentions.safetensors, the ComfyUI port's layout). Default: ["single"].
        """
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        formats = list(formats) if formats is not None else ["single"]
        unknown = [f for f in formats if f not in EXPORT_FORMATS]
        if unknown or not formats:
            raise ValueError(f"export formats must be a non-empty list of {', '.join(EXPORT_FORMATS)}; got {formats}")
        self.formats = list(dict.fromkeys(formats))
        self.every_n_steps = every_n_steps
        self.dirpath = dirpath
        self.prefix = prefix
        self.half = half
        self.export_on_train_end = export_on_train_end
        self._last_exported = -1
        self.last_path: Optional[str] = None

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, filename: str) -> Optional[str]:
        """Export now (call on every rank) as ``filename`` (<name>.safetensors; pairs go to
        the folders <name>-official/, <name>-reexport/); -> the single file's path, else the
        first pair folder (rank 0), or None."""
        ema = find_callback(trainer, EMA)
        path = os.path.join(self.dirpath or output_dir(trainer, "export"), filename)
        stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
        outputs = {fmt: path if fmt == "single" else f"{stem}-{fmt}" for fmt in self.formats}
        with full_parameters(trainer), (ema.averaged(pl_module) if ema else contextlib.nullcontext()):
            if trainer.is_global_zero:
                meta = pl_module.export_metadata()
                meta["ema"] = str(ema.decay) if ema is not None and ema.enabled else "off"
                weights = pl_module.core.ssr
                if self.half:
                    import copy

                    weights = copy.deepcopy(weights).half()
                os.makedirs(os.path.dirname(path), exist_ok=True)
                for fmt, output in outputs.items():
                    export_ssr_weights(weights, fmt, output, meta)
                    log.info("exported SSR weights (%s) to %s", fmt, output)
        self._last_exported = trainer.global_step
        self.last_path = next(iter(outputs.values()))
        return self.last_path if trainer.is_global_zero else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_exported:
            self.export(trainer, pl_module, f"{self.prefix}-step{step:07d}.safetensors")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.export_on_train_end:
            self.export(trainer, pl_module, f"{self.prefix}-last.safetensors")


# ---------------------------------------------------------------------------------- samples

def image_grid(rows: List[torch.Tensor]) -> torch.Tensor:
    """rows: R tensors [C_i, 3, H, W] in [0, 1] with the same C -> [3, R*H, C*W]."""
    return torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)


class SampleGrid(Callback):
    """After each validation run, generates images with the current (EMA) weights for fixed
    references (the first ``num_references`` validation samples: their image and query) and
    fixed prompts, and saves a grid as PNG (<log dir>/samples/step<N>.png) and to the
    logger (TensorBoard image). Row = reference; columns: the reference, then one image per
    prompt. Needs validation data (data.val_jsonl or data.val_shards)."""

    def __init__(self, num_references: int = 4, prompts: Optional[List[str]] = None, steps: int = 30,
                 guidance_scale: float = 7.5, subject_scale: float = 1.0, seed: int = 0, enabled: bool = True):
        """
        Args:
            num_references: Validation samples used as references (taken once, then fixed).
            prompts: Prompt templates, one column each; "{caption}" and "{query}" are
                replaced by the reference's caption and query. Default: ["{caption}",
                "a photo of {query} on the beach"].
            steps: DDIM steps per image (paper: 30).
            guidance_scale: Classifier-free guidance scale (paper: 7.5).
            subject_scale: Weight of the subject branch (lambda; paper 1, reference scripts 0.65).
            seed: Seed of the initial noise (the same every time, so grids are comparable).
            enabled: Set false to skip sample generation.
        """
        self.num_references = num_references
        self.prompts = list(prompts) if prompts else ["{caption}", "a photo of {query} on the beach"]
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.subject_scale = subject_scale
        self.seed = seed
        self.enabled = enabled
        self.references: Optional[Dict[str, Any]] = None
        self.last_path: Optional[str] = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.enabled or dataloader_idx != 0:
            return
        have = 0 if self.references is None else len(self.references["query"])
        take = min(self.num_references - have, len(batch["query"]))
        if take <= 0:
            return
        part = {"pixel_values": batch["pixel_values"][:take].detach().cpu(),
                "clip_pixel_values": batch["clip_pixel_values"][:take].detach().cpu(),
                "query": list(batch["query"][:take]), "prompt": list(batch["prompt"][:take])}
        if self.references is None:
            self.references = part
        else:
            for k in ("pixel_values", "clip_pixel_values"):
                self.references[k] = torch.cat([self.references[k], part[k]])
            for k in ("query", "prompt"):
                self.references[k] += part[k]

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or self.references is None:
            return
        refs = self.references
        device = pl_module.device
        n = len(refs["query"])
        _, _, height, width = refs["pixel_values"].shape
        columns = [(refs["pixel_values"] / 2 + 0.5).clamp(0, 1)]
        with full_parameters(trainer, recurse=False), trainer.precision_plugin.forward_context():
            for index, template in enumerate(self.prompts):
                prompts = [template.format(caption=c, query=q) for c, q in zip(refs["prompt"], refs["query"])]
                generator = torch.Generator(device=device).manual_seed(self.seed + index)
                images = pl_module.core.generate(
                    refs["clip_pixel_values"].to(device), refs["query"], prompts, generator, height, width,
                    steps=self.steps, guidance_scale=self.guidance_scale, subject_scale=self.subject_scale)
                columns.append(images.cpu())
        grid = image_grid([torch.stack([c[r] for c in columns]) for r in range(n)])
        folder = output_dir(trainer, "samples")  # on every rank: trainer.log_dir is a collective
        if trainer.is_global_zero:
            self._save(trainer, folder, grid, refs)

    def _save(self, trainer: pl.Trainer, folder: str, grid: torch.Tensor, refs: Dict[str, Any]) -> None:
        from PIL import Image

        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step{trainer.global_step:07d}.png")
        pixels = (grid.permute(1, 2, 0).float().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        legend = os.path.join(folder, "legend.json")
        if not os.path.exists(legend):
            with open(legend, "w", encoding="utf-8") as f:
                json.dump({"rows": [{"query": q, "caption": c} for q, c in zip(refs["query"], refs["prompt"])],
                           "columns": ["reference"] + self.prompts, "steps": self.steps,
                           "guidance_scale": self.guidance_scale, "subject_scale": self.subject_scale}, f, indent=1)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("samples", grid.float(), trainer.global_step)
            elif hasattr(logger, "log_image"):  # e.g. Weights & Biases
                logger.log_image(key="samples", images=[path], step=trainer.global_step)
        self.last_path = path


# ---------------------------------------------------------------------------------- throughput

class SamplesPerSecond(Callback):
    """Training samples per second over all devices (time between consecutive batch ends,
    so data loading counts), smoothed, shown in the progress bar and logged."""

    def __init__(self, smoothing: float = 0.9):
        """
        Args:
            smoothing: Exponential smoothing of the shown value (0: none).
        """
        self.smoothing = smoothing
        self._last: Optional[float] = None
        self.value: Optional[float] = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None  # do not count the gap between epochs (validation, loader restart)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None and now > self._last:
            rate = len(batch["prompt"]) * trainer.world_size / (now - self._last)
            self.value = rate if self.value is None else self.smoothing * self.value + (1 - self.smoothing) * rate
            pl_module.log("samples_per_s", self.value, prog_bar=True, batch_size=1, rank_zero_only=True)
        self._last = now

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not training throughput
