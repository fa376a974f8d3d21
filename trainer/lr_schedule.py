"""Learning-rate schedules: a factor of the configured rate per optimizer step.

The factor depends only on the optimizer step about to be taken, so a resumed run follows
the same curve as an uninterrupted one, and the rate comes from the current configuration
at every step (``SSRTrainingModule.on_before_optimizer_step`` writes it into the optimizer),
not from the optimizer state a checkpoint restores.

- warm-up: a linear ramp over the first ``warmup_steps`` steps, (step + 1) / warmup_steps,
  so the first step already moves at a small rate instead of zero;
- "constant" (the paper's): factor 1 after the warm-up;
- "cosine": from 1 after the warm-up down to ``min_factor`` at ``total_steps`` along half a
  cosine, then held at ``min_factor``.
"""
from __future__ import annotations

import math
from typing import Optional

LR_SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str, warmup_steps: int, min_factor: float, total_steps: Optional[int]) -> None:
    """Raise ValueError for settings no schedule can follow."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"lr_warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_factor <= 1.0:
        raise ValueError(f"lr_min_factor must be in [0, 1], got {min_factor}")
    if schedule == "cosine" and total_steps is not None and total_steps <= warmup_steps:
        raise ValueError(f"the cosine schedule needs more steps ({total_steps}) than the warm-up ({warmup_steps})")


def lr_factor(step: int, schedule: str = "constant", warmup_steps: int = 0, total_steps: Optional[int] = None,
              min_factor: float = 0.0) -> float:
    """Factor of the base learning rate for optimizer step ``step`` (0 = the first update).
    ``total_steps``: where the cosine reaches ``min_factor`` (needed for "cosine")."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError("the cosine schedule needs its length (lr_schedule_steps or trainer.max_steps)")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
