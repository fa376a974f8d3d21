"""Skipped samples: the reasons a sample cannot be used (``SKIP_REASONS``), the exception
that says so (``SkipSample``) and the per-reason counts that DataLoader workers share with
the main process (``SkipCounter``, read as ``SubjectDataModule.skipped``).

Unreadable images, missing files, empty captions and malformed rows are skipped, logged and
counted here rather than failing the run; ``MAX_CONSECUTIVE_SKIPS`` in a row stop it.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Dict

import torch
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

# A misconfigured image_root makes every row fail; stop instead of skipping the whole dataset.
MAX_CONSECUTIVE_SKIPS = 32


SKIP_REASONS = ("missing_file", "corrupt_image", "too_large", "empty_caption", "bad_row", "missing_image",
                "tar_read_error")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter key (e.g. "corrupt_image")."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        assert reason in SKIP_REASONS, reason
        self.reason = reason


class SkipCounter:
    """Skipped samples by reason, counted in DataLoader workers and read in the main process.

    One row of a shared-memory tensor per process (main process: row 0, worker i: row
    i + 1), so counts need no lock and no trip through the batches. Works with fork and
    spawn workers (torch shares the storage when the dataset is pickled).
    """

    def __init__(self, max_workers: int = 256):
        self.counts = torch.zeros(max(1, max_workers) + 1, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        self.base: Counter = Counter()  # restored from a checkpoint

    def add(self, skip: SkipSample) -> None:
        log.warning("skipping sample: %s", skip)
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id % (self.counts.shape[0] - 1)
        self.counts[row, SKIP_REASONS.index(skip.reason)] += 1

    def totals(self) -> Dict[str, int]:
        """{reason: count} over all processes, including the restored counts; zeros left out."""
        totals = Counter(self.base)
        totals.update({r: int(n) for r, n in zip(SKIP_REASONS, self.counts.sum(0).tolist()) if n})
        return dict(totals)

    def restore(self, totals: Dict[str, int]) -> None:
        self.base = Counter(totals)
        self.counts.zero_()
