"""Progress a person can follow in a terminal and in a log file (SLURM, nohup).

``ProgressLog`` prints a plain line every ``every_n_steps`` optimizer steps (step of the
run's total, samples/s, the loss and its two terms, elapsed time and ETA), one after each
validation, and at the end the skipped samples per reason. ``StepProgressBar`` is the
terminal bar: one bar over the run's optimizer steps (not a bar per epoch labelled with
an epoch count that step-based runs do not have); it is only shown on a terminal, as a
bar redrawn in a file is unreadable.
"""
from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Dict, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

LOSS_PARTS = (("train/loss", "loss"), ("train/loss_ldm", "ldm"), ("train/loss_reg", "reg"))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds)))) if math.isfinite(seconds) else "?"


def total_steps(trainer: pl.Trainer) -> Optional[int]:
    """Optimizer steps the run will take (max_steps, or derived from max_epochs); None if unknown."""
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) else None


class StepProgressBar(TQDMProgressBar):
    """One tqdm bar over the run's optimizer steps, resumed runs starting where they are."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=total_steps(trainer))
        bar.n = trainer.global_step
        bar.set_description("step")
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_) -> None:
        pass  # the bar runs across epochs

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        bar = self.train_progress_bar
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class ProgressLog(Callback):
    """Plain progress lines (global rank 0) and the skipped-sample summary at the end."""

    def __init__(self, every_n_steps: int = 100, bar: Optional[bool] = None):
        """
        Args:
            every_n_steps: Print a progress line every this-many optimizer steps (0: never):
                step/total, samples/s since the last line (all devices), loss with its L_LDM
                and L_reg terms averaged since the last line, elapsed time, ETA.
            bar: Show the step progress bar: null (default) only when stderr is a terminal,
                so log files get the lines alone; true / false force it.
        """
        if every_n_steps < 0:
            raise ValueError(f"progress.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.bar = bar
        self.lines = []  # what was printed, for the run's callers
        self._reset_window(None)
        self._start: Optional[float] = None
        self._start_step = 0
        self._last_step = -1

    def show_bar(self) -> bool:
        return sys.stderr.isatty() if self.bar is None else self.bar

    def _reset_window(self, now: Optional[float]) -> None:
        self._window_start = now
        self._window_samples = 0
        self._window_batches = 0
        self._window_sums: Dict[str, float] = {}

    def _print(self, trainer: pl.Trainer, line: str) -> None:
        self.lines.append(line)
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.is_enabled and bar.train_progress_bar is not None:
            bar.print(line)  # above the bar instead of through it
        else:
            print(line, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._start_step = self._last_step = trainer.global_step
        self._reset_window(self._start)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._window_samples += len(batch["prompt"]) * trainer.world_size
        self._window_batches += 1
        for key, _ in LOSS_PARTS:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self._window_sums[key] = self._window_sums.get(key, 0.0) + float(value)
        step = trainer.global_step
        if not self.every_n_steps or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        if trainer.is_global_zero:
            self._print(trainer, self.progress_line(trainer, step, time.perf_counter()))
        self._reset_window(time.perf_counter())

    def progress_line(self, trainer: pl.Trainer, step: int, now: float) -> str:
        total = total_steps(trainer)
        parts = [f"step {step}/{total} ({100.0 * step / total:.1f}%)" if total else f"step {step}"]
        window = now - self._window_start
        parts.append(f"{self._window_samples / window:.2f} samples/s" if window > 0 else "? samples/s")
        if self._window_batches and self._window_sums:
            mean = {k: v / self._window_batches for k, v in self._window_sums.items()}
            losses = [f"{label} {mean[key]:.4f}" for key, label in LOSS_PARTS if key in mean]
            parts.append(losses[0] + (f" ({', '.join(losses[1:])})" if len(losses) > 1 else ""))
        elapsed = now - self._start
        done = step - self._start_step
        parts.append(f"elapsed {_duration(elapsed)}")
        if total and done > 0:
            parts.append(f"ETA {_duration(elapsed / done * (total - step))}")
        return " | ".join(parts)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING:
            return  # `validate` prints its own table (and its step count is 0)
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            self._print(trainer, f"validation at step {trainer.global_step}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items())))
        if self._start is not None:  # validation time counts in the ETA (elapsed), not in samples/s
            self._reset_window(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        for label, attribute in (("training", "skipped"), ("validation", "val_skipped")):
            counts = getattr(datamodule, attribute, None) if datamodule is not None else None
            if counts is None:
                continue
            totals = summed_over_ranks(trainer, dict(counts))  # every rank takes part
            if trainer.is_global_zero:
                text = ", ".join(f"{reason} {n}" for reason, n in sorted(totals.items()) if n) or "none"
                self._print(trainer, f"skipped {label} samples: {text}"
                            + (f" ({sum(totals.values())} in all)" if any(totals.values()) else ""))


def summed_over_ranks(trainer: pl.Trainer, counts: Dict[str, int]) -> Dict[str, int]:
    """{reason: count} summed over all ranks (a collective with several devices)."""
    from .skips import SKIP_REASONS

    if trainer.world_size == 1:
        return counts
    vector = torch.tensor([counts.get(r, 0) for r in SKIP_REASONS], dtype=torch.float64,
                          device=trainer.strategy.root_device)
    vector = trainer.strategy.reduce(vector, reduce_op="sum")
    return {r: int(n) for r, n in zip(SKIP_REASONS, vector.tolist())}
