"""The JSONL training/validation source: map-style, resumable mid-epoch to the exact sample.

One ``{"file_name": ..., "text": ..., "query": ...}`` object per line ("query" optional),
images under ``image_root`` (the reference trainer's format).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .samples import SampleTransform, caption_and_query, load_rgb_image, sample_rng
from .skips import MAX_CONSECUTIVE_SKIPS, SkipCounter, SkipSample


# ----------------------------------------------------------------------------- JSONL (map-style)


class JsonlImageTextDataset(Dataset):
    """Rows of a JSONL file: ``{"file_name": str, "text": str, "query": str (optional)}``.

    ``file_name`` is relative to ``image_root`` (default: the JSONL's folder) or absolute.
    Only the byte offsets of the lines are kept in memory (16 bytes a row), so tens of
    millions of rows fit and forked workers do not copy Python objects.

    ``dataset[(epoch, row)]`` (what ``EpochPermutationSampler`` yields) or ``dataset[row]``
    (epoch 0) returns one sample dict; a row that cannot be used is logged, counted in
    ``skip_counter`` and replaced by the next row (row + 1, ...).
    """

    def __init__(self, jsonl_path: str, image_root: Optional[str], transform: SampleTransform,
                 seed: int, max_image_pixels: int, skip_counter: Optional[SkipCounter] = None):
        self._file, self._file_pid = None, -1  # per-process handle, opened on first read
        self.jsonl_path = str(jsonl_path)
        self.image_root = str(image_root) if image_root else os.path.dirname(os.path.abspath(self.jsonl_path))
        self.transform = transform
        self.seed = seed
        self.max_image_pixels = max_image_pixels
        self.skip_counter = skip_counter or SkipCounter()
        if not os.path.isfile(self.jsonl_path):
            raise FileNotFoundError(f"{self.jsonl_path}: JSONL file not found")
        if not os.path.isdir(self.image_root):
            raise FileNotFoundError(f"image_root {self.image_root!r} (for {self.jsonl_path}) is not a folder")
        starts, lengths = [], []
        with open(self.jsonl_path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():  # blank lines are not rows
                    starts.append(offset)
                    lengths.append(len(line))
                offset += len(line)
        if not starts:
            raise ValueError(f"{self.jsonl_path}: no rows; expected one JSON object per line with "
                             "'file_name' and 'text' (and optionally 'query')")
        self.line_starts = np.asarray(starts, dtype=np.int64)
        self.line_lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.line_starts)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_file_pid"] = None, -1  # each process opens its own handle
        return state

    def __del__(self):
        if self._file is not None and self._file_pid == os.getpid():
            self._file.close()

    def _read_line(self, row: int) -> bytes:
        # One handle per process: a handle inherited through fork shares its file offset.
        if self._file is None or self._file_pid != os.getpid():
            self._file = open(self.jsonl_path, "rb")
            self._file_pid = os.getpid()
        self._file.seek(int(self.line_starts[row]))
        return self._file.read(int(self.line_lengths[row]))

    def read_row(self, row: int) -> Tuple[Image.Image, str, str, str]:
        """-> (RGB image, caption, query, file_name); raises SkipSample."""
        where = f"{self.jsonl_path} row {row}"
        try:
            record = json.loads(self._read_line(row))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SkipSample("bad_row", f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise SkipSample("bad_row", f"{where}: expected a JSON object, got {type(record).__name__}")
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise SkipSample("bad_row", f"{where}: 'file_name' must be a non-empty string")
        if "text" not in record:
            raise SkipSample("bad_row", f"{where}: no 'text' field")
        caption, query = caption_and_query(record["text"], record.get("query"), where)
        path = os.path.join(self.image_root, file_name)
        image = load_rgb_image(path, what=f"{where} ({path})", max_pixels=self.max_image_pixels)
        return image, caption, query, file_name

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        skips: List[SkipSample] = []
        # A file shorter than the limit is tried once per row, not round and round.
        for attempt in range(min(MAX_CONSECUTIVE_SKIPS, len(self))):
            row = (index + attempt) % len(self)
            try:
                image, caption, query, file_name = self.read_row(row)
            except SkipSample as skip:
                self.skip_counter.add(skip)
                skips.append(skip)
                continue
            sample = self.transform(image, caption, query, sample_rng(self.seed, epoch, row))
            sample["key"] = file_name
            return sample
        raise RuntimeError(unusable_rows_message(self, index, skips))


def unusable_rows_message(dataset: "JsonlImageTextDataset", first_row: int, skips: Sequence[SkipSample]) -> str:
    """What is wrong when ``skips`` (consecutive, from ``first_row``) left no usable row."""
    reasons = ", ".join(f"{reason} x{count}" for reason, count in Counter(s.reason for s in skips).items())
    if len(skips) >= len(dataset):
        what = f"none of its {len(dataset)} rows is usable ({reasons})"
    else:
        what = f"{len(skips)} consecutive unusable rows from row {first_row} ({reasons})"
    hint = f"file_name is relative to image_root={dataset.image_root!r}" if any(
        s.reason == "missing_file" for s in skips) else "see docs/training.md, Data"
    return f"{dataset.jsonl_path}: {what}; the first: {skips[0]}; {hint}"
