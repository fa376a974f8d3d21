"""The WebDataset training/validation source: tar shards as img2dataset writes them
(``00000.tar`` holding ``key.jpg`` + ``key.txt`` + ``key.json``), streamed shard by shard
with a shuffle buffer. ``trainer.precomputed_reader`` streams precomputed shards through the
same class.
"""
from __future__ import annotations

import io
import json
import os
import zlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .samples import SampleTransform, caption_and_query, load_rgb_image, sample_rng
from .skips import SkipCounter, SkipSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# ----------------------------------------------------------------------------- WebDataset (streamed)


def expand_shards(pattern: str) -> List[str]:
    """Brace-expand a shard pattern ("data/{00000..00099}.tar", several joined with "::")
    and check local files exist (URLs and "pipe:" commands are left to the reader)."""
    from webdataset.shardlists import expand_urls

    shards = expand_urls(pattern)
    if not shards:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    for shard in shards:
        if "://" not in shard and not shard.startswith("pipe:") and not os.path.isfile(shard):
            raise FileNotFoundError(f"shard {shard!r} (from pattern {pattern!r}) does not exist")
    return shards


def _buffer_shuffle(items: Iterable[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``buffer_size`` items (1 = no shuffling)."""
    buffer: List[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


class WebDatasetImageText(IterableDataset):
    """Samples from img2dataset-style tar shards: key.{jpg,jpeg,png,webp} + key.txt
    (caption) + key.json (optional; "caption" if there is no .txt, "query" if present).

    Shards are shuffled per epoch (seed, epoch, restart), dealt to devices (shard i goes to
    device i % num_replicas) and then to DataLoader workers, read in order and shuffled
    through a buffer. ``cycle=True`` reads each worker's shards again and again (reshuffled
    each pass) so the stream never ends; the DataLoader then cuts epochs to a fixed number
    of batches, which keeps devices in step. Set ``epoch``/``restart`` in the main process
    before iterating (``EpochDataLoader`` does); workers see the values of that moment.
    """

    def __init__(self, shards: Sequence[str], transform: SampleTransform, seed: int, max_image_pixels: int,
                 shuffle_buffer: int = 1000, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 cycle: bool = False, skip_counter: Optional[SkipCounter] = None):
        if len(shards) < num_replicas:
            raise ValueError(f"{len(shards)} shards for {num_replicas} devices: every device needs at least one shard")
        self.shards = list(shards)
        self.transform = transform
        self.seed = seed
        self.max_image_pixels = max_image_pixels
        self.shuffle_buffer = max(1, shuffle_buffer) if shuffle else 1
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.cycle = cycle
        self.skip_counter = skip_counter or SkipCounter()
        self.epoch = 0
        self.restart = 0  # bumped on each mid-epoch resume, so the replayed epoch is reshuffled

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _worker(self) -> Tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _raw_samples(self) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """-> (pass number, {"__key__", "__url__", extension: bytes, ...}) for this worker."""
        from webdataset.tariterators import tarfile_samples

        def handler(exc: Exception) -> bool:
            self.skip_counter.add(SkipSample("tar_read_error", str(exc)))
            return True  # continue with the next member/shard

        shards = list(self.shards)
        if self.shuffle:
            sample_rng(self.seed, self.epoch, self.restart).shuffle(shards)
        worker, num_workers = self._worker()
        mine = shards[self.rank::self.num_replicas][worker::num_workers]
        if not mine:
            return
        pass_number = 0
        while True:
            members = 0
            for raw in tarfile_samples(({"url": url} for url in mine), handler=handler):
                members += 1
                yield pass_number, raw
            if not self.cycle:
                return
            if members == 0:  # cycling would spin forever
                raise RuntimeError(f"no readable samples in shards {mine}")
            self._pass_size = members
            pass_number += 1
            sample_rng(self.seed, self.epoch, self.restart, self.rank, worker, pass_number).shuffle(mine)

    def decode(self, raw: Dict[str, Any]) -> Tuple[Image.Image, str, str]:
        """One raw tar sample -> (RGB image, caption, query); raises SkipSample."""
        where = f"{raw.get('__url__')} key {raw.get('__key__')}"
        meta: Dict[str, Any] = {}
        try:
            if "json" in raw:
                meta = json.loads(raw["json"])
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            caption = raw["txt"].decode("utf-8") if "txt" in raw else meta.get("caption")
        except (ValueError, UnicodeDecodeError) as exc:
            raise SkipSample("bad_row", f"{where}: unreadable .txt/.json ({exc})") from exc
        if caption is None:
            raise SkipSample("empty_caption", f"{where}: no .txt and no 'caption' in .json")
        caption, query = caption_and_query(caption, meta.get("query"), where)
        extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if extension is None:
            raise SkipSample("missing_image", f"{where}: no image member ({', '.join(IMAGE_EXTENSIONS)})")
        image = load_rgb_image(io.BytesIO(raw[extension]), what=f"{where}.{extension}",
                               max_pixels=self.max_image_pixels)
        return image, caption, query

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker, _ = self._worker()
        stream = self._raw_samples()
        if self.shuffle:
            stream = _buffer_shuffle(stream, self.shuffle_buffer,
                                     sample_rng(self.seed, self.epoch, self.restart, self.rank, worker, 1 << 20))
        self._pass_size: Optional[int] = None  # samples in one pass over this worker's shards
        consecutive_skips = 0
        for pass_number, raw in stream:
            rng = sample_rng(self.seed, self.epoch, pass_number, _crc(raw.get("__url__", "")), _crc(raw.get("__key__", "")))
            try:
                sample = self.sample_from_raw(raw, rng)
            except SkipSample as skip:
                self.skip_counter.add(skip)
                consecutive_skips += 1
                # Cycling shards that hold no usable sample would spin forever. Passes mix in
                # the shuffle buffer, so allow a few passes plus a buffer of skips in a row.
                if self._pass_size is not None and consecutive_skips > 3 * (self._pass_size + self.shuffle_buffer):
                    raise RuntimeError(f"no usable samples in shards {self.shards} (last: {skip})") from skip
                continue
            consecutive_skips = 0
            sample["key"] = f"{raw['__url__']}/{raw['__key__']}"
            yield sample

    def sample_from_raw(self, raw: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
        """One raw tar sample -> one training sample (``self.transform``); raises SkipSample.
        Subclasses reading other shard layouts replace this."""
        image, caption, query = self.decode(raw)
        return self.transform(image, caption, query, rng)
