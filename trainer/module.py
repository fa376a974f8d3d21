"""The LightningModule: loads the frozen models, trains the SSR weights, logs both loss terms."""
from __future__ import annotations

import os
from typing import Any, Dict, Literal, Optional, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn

from ssr import load_clip_image_encoder, load_ssr_weights
from ssr.layers import FAMILIES

from .core import LatentCache, SSRTrainingCore, new_ssr_weights, vae_identity, weights_identity
from .losses import DEFAULT_TAU
from .lr_schedule import check_schedule, lr_factor
from .sd_loading import load_stable_diffusion

TRAINABLE_PREFIX = "core.ssr."


def step_seed(*parts: int) -> int:
    """A 63-bit seed determined by non-negative ints (e.g. seed, step, rank, stream)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) >> 1


class SSRTrainingModule(pl.LightningModule):
    """Trains SSR-Encoder weights (aligner + subject encoder + per-layer K_S/V_S) against a
    frozen Stable Diffusion 1.x model and a frozen CLIP ViT-L/14 vision tower.

    Checkpoints hold only the trainable weights (plus optimizer, loop and callback state);
    the frozen models are loaded again from ``pretrained_model`` / ``clip_vision``.
    """

    def __init__(
        self,
        pretrained_model: str,
        clip_vision: str,
        sd_config_dir: Optional[str] = None,
        init_weights: Optional[str] = None,
        regularizer: Literal["reference", "paper"] = "reference",
        tau: Optional[float] = None,
        single_scale_steps: int = 0,
        learning_rate: float = 5e-5,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lr_warmup_steps: int = 0,
        lr_schedule_steps: Optional[int] = None,
        lr_min_factor: float = 0.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        reg_on_dropped_subjects: bool = False,
        gradient_checkpointing: bool = False,
        cache_latents: bool = False,
        latent_cache_dir: Optional[str] = None,
        latent_cache_items: int = 50_000,
        frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        encoder_inner_dim: int = 512,
        encoder_heads: int = 8,
        init_kv_from_text: bool = True,
        clip_expect_width: Optional[int] = 1024,
        seed: int = 0,
    ):
        """
        Args:
            pretrained_model: Stable Diffusion 1.x model: a single-file checkpoint in the
                WebUI/ldm layout (.safetensors or .ckpt) or a diffusers model folder. Frozen.
            clip_vision: OpenAI CLIP ViT-L/14 vision weights: a Hugging Face folder or
                file, an open_clip state dict, or OpenAI's ViT-L-14.pt converted once with
                `convert.py --trust-torchscript` (TorchScript is refused: it runs code). Frozen.
            sd_config_dir: Architecture configs for a single-file checkpoint (a folder with
                unet/, vae/, text_encoder/, scheduler/ configs, e.g. a diffusers model
                folder). Default: the SD1.5 configs shipped in trainer/sd15. Read locally.
            init_weights: SSR weights to start from (fine-tuning): our single .safetensors,
                the official pytorch_model.bin + pytorch_model_1.bin pair (a folder or one
                of them), or the ssr_aligner/ssr_attentions.safetensors pair. Default: new
                weights. A Lightning checkpoint given as --ckpt_path overrides this.
            regularizer: Form of the embedding-consistency term L_reg. "reference" (the
                default; the reference trainer, which produced the released weights): sum
                over the 6 scales of the token-wise mean of 1 - cos(out_k, z_q). "paper": the
                token-wise mean of 1 - cos(mean over scales of c_s, z_q).
            tau: Weight of L_reg in loss = L_LDM + tau * L_reg. Default: 0.1 for "reference"
                (the reference trainer; it used 0.001 for fine-tuning), 0.01 for "paper".
            single_scale_steps: Two-stage schedule: the first this-many optimizer steps are
                single-scale (every one of the 6 scales is fed the last CLIP scale z_6), the
                rest multi-scale (z_1..z_6), continuing from the stage-one weights. 0: multi-
                scale from the start. Paper: 1 M single-scale steps, then 100 k multi-scale.
            learning_rate: AdamW learning rate (the peak, with a warm-up or cosine). Paper: 5e-5.
            lr_schedule: "constant" (the paper's) or "cosine" (from learning_rate after the
                warm-up down to lr_min_factor * learning_rate at lr_schedule_steps).
            lr_warmup_steps: Linear warm-up over this many optimizer steps (0: none, the paper's).
            lr_schedule_steps: Length of the cosine in optimizer steps (default:
                trainer.max_steps); after it the rate stays at its floor.
            lr_min_factor: Floor of the cosine as a fraction of learning_rate.
            betas: AdamW betas.
            weight_decay: AdamW weight decay.
            reg_on_dropped_subjects: Also apply L_reg to rows whose subject was dropped (zero
                CLIP input, "" query). Off (default): there z_q is the empty text's embedding,
                and L_reg would pull the unconditional subject embedding, CFG's negative,
                towards it; those rows then train through L_LDM only.
            gradient_checkpointing: Recompute UNet activations in the backward pass (diffusers'
                gradient checkpointing): much less memory, about 35% slower.
            cache_latents: Keep VAE latent distributions of the SD views (keyed by sample key
                and a pixel fingerprint, so flipped views are separate entries) so the VAE
                runs once per view; pays off from the second epoch on.
            latent_cache_dir: Also store cached latents in this folder (shared by ranks, kept
                across runs, one subfolder per VAE). Needs cache_latents.
            latent_cache_items: Latent cache entries kept in memory (fp16, about 64 KB each
                at 512 px).
            frozen_dtype: Dtype of the frozen models. "auto": bfloat16 under bf16 precision
                (except with FSDP, which needs one dtype per flat parameter), else float32.
            encoder_inner_dim: Aligner width for new weights (released: 512).
            encoder_heads: Aligner heads for new weights (released: 8).
            init_kv_from_text: For new weights, start each layer's K_S/V_S as a copy of its
                text K/V projections (else PyTorch's default init).
            clip_expect_width: Required CLIP vision width (1024 = ViT-L/14); null disables
                the check (tests, other encoders).
            seed: Seed of the per-step noise/timestep generator (linked to seed_everything by
                the CLI); noise depends only on (seed, step, rank), so a resumed run draws
                the same noise as an uninterrupted one.
        """
        super().__init__()
        self.save_hyperparameters()
        if regularizer not in DEFAULT_TAU:
            raise ValueError(f"regularizer must be 'reference' or 'paper', got {regularizer!r}")
        if single_scale_steps < 0:
            raise ValueError(f"single_scale_steps must be >= 0, got {single_scale_steps}")
        check_schedule(lr_schedule, lr_warmup_steps, lr_min_factor, lr_schedule_steps)
        if latent_cache_dir and not cache_latents:
            raise ValueError("latent_cache_dir is set but cache_latents is false; set cache_latents: true")
        self.tau = DEFAULT_TAU[regularizer] if tau is None else float(tau)
        sd = load_stable_diffusion(pretrained_model, sd_config_dir)
        image_encoder = load_clip_image_encoder(clip_vision, expect_width=clip_expect_width)
        text_dim = sd.text_encoder.config.hidden_size
        if init_weights:
            ssr_weights = load_ssr_weights(init_weights, expect_family="sd1" if FAMILIES.get(text_dim) == "sd1" else None)
        else:
            ssr_weights = new_ssr_weights(sd.unet, text_dim, image_encoder.config.width, encoder_inner_dim,
                                          encoder_heads, init_kv_from_text)
        cache = None
        if cache_latents:
            cache = LatentCache(vae_identity(sd.vae), latent_cache_items, latent_cache_dir)
        self.core = SSRTrainingCore(sd, image_encoder, ssr_weights, regularizer, self.tau, cache,
                                    reg_on_dropped_subjects=reg_on_dropped_subjects)
        if gradient_checkpointing:
            self.core.unet.enable_gradient_checkpointing()
        self.base_model_name = sd.source
        # Of the weights as loaded (fp32), before setup may cast them: precomputed shards
        # record the same ids and must come from these models.
        self.frozen_ids = {"vae": vae_identity(sd.vae), "text_encoder": weights_identity(sd.text_encoder, "text")}
        # Checkpoints carry only the trainable weights; the frozen ones come from the files.
        self.strict_loading = False
        self._checkpoint_step = 0  # global_step of a loaded checkpoint (see trained_steps)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        fsdp = isinstance(self.trainer.strategy, FSDPStrategy)
        choice = self.hparams.frozen_dtype
        if choice == "auto":
            choice = "bfloat16" if str(self.trainer.precision).startswith("bf16") and not fsdp else "float32"
        if fsdp and choice != "float32":
            raise ValueError("frozen_dtype must be float32 (or auto) with FSDP: FSDP flattens frozen and trainable "
                             "parameters together and needs one dtype; its mixed precision casts for compute")
        self.core.set_frozen_dtype(getattr(torch, choice))
        self._check_precomputed_data()

    def _check_precomputed_data(self) -> None:
        """Precomputed latents (and text embeddings) must come from this run's VAE (and text
        encoder): other latents train silently against the wrong decoder."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        manifest = getattr(datamodule, "precomputed_manifest", None)
        if not manifest:
            return
        for part, option in (("vae", "VAE"), ("text_encoder", "text encoder")):
            made_with = manifest.get(part)
            if made_with is not None and made_with != self.frozen_ids[part]:
                raise ValueError(f"data.train_precomputed: the shards were precomputed with another {option} "
                                 f"({made_with}, from {manifest.get('base_model')!r}) than model.pretrained_model "
                                 f"has ({self.frozen_ids[part]}); precompute them with this model")

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.core.ssr.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate_at(0), betas=tuple(hp.betas),
                                 weight_decay=hp.weight_decay)

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0 = the first update)."""
        hp = self.hparams
        total = hp.lr_schedule_steps
        if total is None and self._trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            total = self.trainer.max_steps
        return hp.learning_rate * lr_factor(step, hp.lr_schedule, hp.lr_warmup_steps, total, hp.lr_min_factor)

    def on_before_optimizer_step(self, optimizer) -> None:
        # The rate of this step from the configuration (model.lr_*), also right after
        # a resume, where the optimizer state restored the rate of the old run.
        rate = self.learning_rate_at(self.global_step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        self.log("train/lr", rate, batch_size=1)

    # ------------------------------------------------------------------ steps
    def _generator(self, device: torch.device, *stream: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(step_seed(self.hparams.seed, *stream, self.global_rank))

    def trained_steps(self) -> int:
        """Optimizer steps behind the current weights: the trainer's count while fitting; in
        ``validate``/``test``, whose step count starts at 0, the step of the checkpoint given
        as ``ckpt_path``."""
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            return self.global_step
        return max(self.global_step, self._checkpoint_step)

    def single_scale(self) -> bool:
        """Whether the weights are in stage one (single-scale) of the schedule."""
        return self.trained_steps() < self.hparams.single_scale_steps

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        accumulation = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        generator = self._generator(batch["clip_pixel_values"].device, 0, self.global_step, batch_idx % accumulation)
        out = self.core.losses(batch, generator, single_scale=self.single_scale())
        size = len(batch["prompt"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size)
        self.log("train/loss_ldm", out["loss_ldm"], batch_size=size)
        self.log("train/loss_reg", out["loss_reg"], batch_size=size)
        self.log("train/single_scale", float(self.single_scale()), batch_size=size)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.core.set_subject_context(None)  # the context holds this step's graph: let it go
        skipped = getattr(self.trainer.datamodule, "skipped", None) if self.trainer.datamodule is not None else None
        if skipped is not None:
            self.log("data/skipped", float(sum(dict(skipped).values())), batch_size=1)
        cache = self.core.latent_cache
        if cache is not None and cache.hits + cache.misses:
            self.log("data/latent_cache_hit_rate", cache.hits / (cache.hits + cache.misses), batch_size=1)

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        # Fixed noise and timesteps per validation batch, so values are comparable over time.
        generator = self._generator(batch["clip_pixel_values"].device, 1, batch_idx)
        out = self.core.losses(batch, generator, single_scale=self.single_scale())
        self.core.set_subject_context(None)
        size = len(batch["prompt"])
        for name in ("loss", "loss_ldm", "loss_reg"):
            self.log(f"val/{name}", out[name], batch_size=size, sync_dist=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith(TRAINABLE_PREFIX)}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        wanted = {TRAINABLE_PREFIX + k for k in self.core.ssr.state_dict()}
        missing = sorted(wanted - set(checkpoint.get("state_dict", {})))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable SSR tensors (e.g. {missing[:3]}); "
                           "was it written by this trainer with the same model sizes?")
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    # ------------------------------------------------------------------ export
    def export_metadata(self) -> Dict[str, str]:
        """What goes into an exported .safetensors besides the weights."""
        hp = self.hparams
        trainer = self._trainer
        meta = {
            "base_model": self.base_model_name,
            "clip_vision": os.path.basename(os.path.normpath(hp.clip_vision)),
            "init_weights": os.path.basename(os.path.normpath(hp.init_weights)) if hp.init_weights else "new",
            "regularizer": hp.regularizer, "tau": str(self.tau),
            "single_scale_steps": str(hp.single_scale_steps),
            "optimizer": f"AdamW lr={hp.learning_rate} betas={tuple(hp.betas)} weight_decay={hp.weight_decay}",
            "lr_schedule": f"{hp.lr_schedule} warmup={hp.lr_warmup_steps}" + (
                f" steps={hp.lr_schedule_steps} min_factor={hp.lr_min_factor}" if hp.lr_schedule == "cosine" else ""),
            "reg_on_dropped_subjects": str(hp.reg_on_dropped_subjects),
        }
        if trainer is not None:
            meta.update(steps=str(self.global_step), epoch=str(self.current_epoch),
                        stage="single-scale" if self.single_scale() else "multi-scale",
                        precision=str(trainer.precision), devices=str(trainer.world_size))
            dm = trainer.datamodule
            if dm is not None:
                dhp = getattr(dm, "hparams", {})
                meta["data"] = str(dhp.get("train_jsonl") or dhp.get("train_shards") or dhp.get("train_precomputed") or "")
                for key in ("batch_size", "resolution", "prompt_dropout", "subject_dropout"):
                    if key in dhp:
                        meta[key] = str(dhp[key])
        return meta
