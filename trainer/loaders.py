"""DataLoaders for training: ``EpochDataLoader`` tells an epoch-aware dataset which epoch is
starting and can cut epochs to a fixed number of batches; ``ResumableDataLoader`` marks
the JSONL loader as resumable for Lightning (the position lives in
``SubjectDataModule.state_dict``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional

from torch.utils.data import DataLoader


class EpochDataLoader(DataLoader):
    """DataLoader that, in the main process, tells an epoch-aware dataset which epoch is
    starting (before workers copy it) and can end each epoch after ``max_batches``.

    ``epoch_fn`` gives the epoch (the trainer's current epoch); without it the loader counts
    its own passes.
    """

    def __init__(self, dataset, *args, epoch_fn: Optional[Callable[[], int]] = None,
                 max_batches: Optional[int] = None, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn = epoch_fn
        self.max_batches = max_batches
        self._passes = 0

    def __len__(self) -> int:
        if self.max_batches is not None:
            return self.max_batches
        return super().__len__()

    def __iter__(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch_fn() if self.epoch_fn is not None else self._passes)
        self._passes += 1
        batches = super().__iter__()
        if self.max_batches is None:
            return batches
        return _take(batches, self.max_batches)


def _take(iterator: Iterator[Any], count: int) -> Iterator[Any]:
    for _, item in zip(range(count), iterator):
        yield item


class ResumableDataLoader(EpochDataLoader):
    """Marks the JSONL loader as resumable for Lightning (which otherwise warns on a
    mid-epoch resume). Its position is not kept here but in ``SubjectDataModule.state_dict``:
    Lightning prefetches batches, so only the datamodule's count of batches that reached
    the training step is exact."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        pass
