"""Scores a small fixed eval set during training, so a run shows quality, not only loss.

Every ``every_n_steps`` optimizer steps: the first ``num_subjects`` subjects of a bench with
their first ``num_prompts`` prompts are generated with the current (EMA) weights through the
trainer's sampling path, written to ``<run>/eval/stepNNNNNNN/`` in the score step's layout,
scored with the same code as ``python -m trainer.evaluate score``, and ``eval/clip_t``,
``eval/clip_i``, ``eval/dino`` (plus ``eval/clip_es`` / ``eval/dino_m`` on a multi-subject
bench) are logged beside the loss (TensorBoard, metrics.csv). The set and the seed are fixed,
so the curves compare like with like.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback

from .benches import load_bench
from .generate import GenerationSettings, run_generation
from .metrics import summarize

log = logging.getLogger(__name__)


class EvalScores(Callback):
    """CLIP-T / CLIP-I / DINO of a fixed eval set every N steps (off unless every_n_steps > 0)."""

    def __init__(self, every_n_steps: int = 0, bench: Optional[str] = None, clip: Optional[str] = None,
                 clip_arch: Optional[str] = None, dino: Optional[str] = None, num_subjects: int = 4,
                 num_prompts: int = 2, seed: int = 0, steps: int = 30, guidance_scale: float = 7.5,
                 subject_scale: float = 1.0, height: int = 512, width: int = 512):
        """
        Args:
            every_n_steps: Score every this-many optimizer steps; 0 (default) disables it.
            bench: DreamBench folder or multi-subject .jsonl (as for python -m trainer.evaluate).
            clip: CLIP for CLIP-T/CLIP-I (HF CLIPModel folder or open_clip/OpenAI state dict;
                common choice ViT-B/32).
            clip_arch: open_clip architecture name for a non-OpenAI-shaped clip state dict.
            dino: DINO for the DINO score (HF folder or torch.hub .pth; common choice ViT-S/16).
            num_subjects: The first this-many subjects of the bench form the eval set.
            num_prompts: Their first this-many prompts.
            seed: One fixed seed for every eval image.
            steps: DDIM steps (paper: 30).
            guidance_scale: Classifier-free guidance (paper: 7.5).
            subject_scale: Subject branch weight lambda.
            height: Image height.
            width: Image width.
        """
        if every_n_steps < 0:
            raise ValueError(f"eval.every_n_steps must be >= 0, got {every_n_steps}")
        if every_n_steps and not (bench and clip and dino):
            raise ValueError("eval.every_n_steps is set: eval.bench, eval.clip and eval.dino are required "
                             "(a bench, a CLIP model and a DINO model; see docs/evaluation.md)")
        self.every_n_steps = every_n_steps
        self.bench_path, self.clip_path, self.clip_arch, self.dino_path = bench, clip, clip_arch, dino
        self.num_subjects, self.num_prompts = num_subjects, num_prompts
        self.settings = GenerationSettings(seeds=[seed], steps=steps, guidance_scale=guidance_scale,
                                           subject_scale=subject_scale, height=height, width=width)
        self._bench = None
        self._models = None
        self._last_step = -1
        self.last_scores: Optional[dict] = None

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled:
            return
        # Read the bench now, so a wrong path fails before training starts.
        bench = load_bench(self.bench_path)
        bench.subjects = [copy.copy(s) for s in bench.subjects[:self.num_subjects]]
        for s in bench.subjects:
            s.prompts = s.prompts[:self.num_prompts]
        self._bench = bench

    def _scoring_models(self, device):
        if self._models is None:
            from .loaders import load_clip, load_dino
            from .scoring import ScoringModels

            self._models = ScoringModels(load_clip(self.clip_path, self.clip_arch, device), load_dino(self.dino_path, device))
        return self._models

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.enabled or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self.score(trainer, pl_module)

    @torch.no_grad()
    def score(self, trainer, pl_module) -> dict:
        """Generate and score the eval set now (every rank; images and scores are the same on
        each); logs eval/* and returns the mean scores."""
        from ..callbacks import EMA, find_callback, full_parameters, output_dir
        from .scoring import score_images

        folder = output_dir(trainer, os.path.join("eval", f"step{trainer.global_step:07d}"))
        if trainer.world_size > 1:
            folder = os.path.join(folder, f"rank{trainer.global_rank}")  # ranks must not share files
        ema = find_callback(trainer, EMA)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with full_parameters(trainer, recurse=False), \
                    (ema.averaged(pl_module) if ema is not None else contextlib.nullcontext()), \
                    trainer.precision_plugin.forward_context():
                run_generation(pl_module.core, self._bench, folder, self.settings, progress=False)
        finally:
            pl_module.train(was_training)
        rows = score_images(self._bench, folder, self._scoring_models(pl_module.device))
        means = {k: v for k, v in summarize(rows).items() if v is not None and k != "aesthetic"}
        for name, value in means.items():
            pl_module.log(f"eval/{name}", value, batch_size=1)
        log.info("eval at step %d: %s", trainer.global_step, ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        self.last_scores = means
        return means
