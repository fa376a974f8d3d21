"""Writing one precomputed shard (layout: ``trainer.precomputed_format``).

A shard is written under a temporary name and renamed when complete, together with its
statistics file (``<shard>.stats.json``: samples written, skipped by reason), so a shard
that exists under its real name is whole; an interrupted precompute run redoes only the
shards it had not finished.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from typing import Dict, Optional

import torch

from ssr.files import current_umask

from .precomputed_format import encode_sample


def stats_path(shard_path: str) -> str:
    """The statistics file beside a shard: ``00012.tar`` -> ``00012.stats.json``."""
    return shard_path[:-len(".tar")] + ".stats.json" if shard_path.endswith(".tar") else shard_path + ".stats.json"


def shard_is_complete(shard_path: str) -> bool:
    return os.path.isfile(shard_path) and os.path.isfile(stats_path(shard_path))


class ShardWriter:
    """Writes samples into ``path`` (a .tar) via a temporary file; ``close()`` publishes it.

    Used as a context manager: leaving the block with an exception discards the partial
    file. Keys are made from the shard's index and the sample's position, so they carry no
    dots (WebDataset splits member names at the first dot)."""

    def __init__(self, path: str, shard_index: int):
        self.path = path
        self.shard_index = shard_index
        self.tmp_path = f"{path}.{os.getpid()}.tmp"
        self.count = 0
        self.skipped: Counter = Counter()
        self._tar: Optional[tarfile.TarFile] = tarfile.open(self.tmp_path, "w")

    def add(self, caption: str, query: str, source: str, tensors: Dict[str, torch.Tensor]) -> str:
        """Append one sample; -> its key."""
        key = f"s{self.shard_index:06d}_{self.count:06d}"
        for extension, data in encode_sample(caption, query, source, tensors).items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        return key

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def close(self) -> None:
        """Finish the tar, write the statistics, then give the shard its real name."""
        self._tar.close()
        self._tar = None
        stats = {"samples": self.count, "skipped": dict(self.skipped)}
        stats_tmp = f"{stats_path(self.path)}.{os.getpid()}.tmp"
        with open(stats_tmp, "w", encoding="utf-8") as f:
            json.dump(stats, f)
        mode = 0o666 & ~current_umask()
        os.chmod(self.tmp_path, mode)
        os.chmod(stats_tmp, mode)
        # Statistics first: a shard under its real name always has them.
        os.replace(stats_tmp, stats_path(self.path))
        os.replace(self.tmp_path, self.path)

    def discard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()
