"""Order of the JSONL training rows: one seeded permutation per epoch, dealt to devices, able
to start inside an epoch (the resume position kept by ``SubjectDataModule``)."""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

from torch.utils.data import Dataset, DistributedSampler


class EpochPermutationSampler(DistributedSampler):
    """A seeded permutation of the rows per epoch (seed + epoch), split across devices,
    that can resume inside an epoch; yields (epoch, row) pairs.

    ``epoch_fn`` (the trainer's current epoch) is asked when an iteration starts. That is the
    moment a DataLoader with workers draws its first indices, and Lightning creates the first
    iterator of a run before it calls ``set_epoch``: a resumed run in epoch >= 1 would
    otherwise prefetch, and then serve, epoch 0's permutation. Without ``epoch_fn`` the
    value of ``set_epoch`` is used.

    Subclasses DistributedSampler only so that Lightning uses it as it is instead of
    wrapping it in another distributed sampler; it works without torch.distributed.
    Every device gets len(dataset) // num_replicas rows (the remainder is dropped).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 epoch_fn: Optional[Callable[[], int]] = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch_fn = epoch_fn
        self._resume: Optional[Tuple[int, int]] = None  # (epoch, rows this device already used)

    def resume_at(self, epoch: int, samples_per_device: int) -> None:
        """Make the iteration over ``epoch`` skip its first ``samples_per_device`` rows."""
        self._resume = (epoch, samples_per_device) if samples_per_device > 0 else None

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        # Decided here, eagerly, not on the first next(): see the class docstring.
        if self.epoch_fn is not None:
            self.set_epoch(int(self.epoch_fn()))
        epoch = self.epoch
        rows = list(super().__iter__())
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        return self._rows(epoch, rows, skip)

    def _rows(self, epoch: int, rows, skip: int) -> Iterator[Tuple[int, int]]:
        for row in rows[skip:]:
            yield epoch, row
        # Forget the resume point only once that epoch was read to its end: an iterator that
        # was created and thrown away (Lightning may do that while setting up) keeps it.
        if skip:
            self._resume = None
