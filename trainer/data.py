"""Training data for the SSR-Encoder trainer.

Two sources of (image, caption[, query]) pairs:

* a JSONL file, one ``{"file_name": ..., "text": ..., "query": ...}`` object per line
  ("query" optional), images under ``image_root`` (the reference trainer's format);
  map-style, resumable mid-epoch to the exact sample;
* WebDataset tar shards as img2dataset writes them (``00000.tar`` holding ``key.jpg`` +
  ``key.txt`` + ``key.json``), streamed shard by shard with a shuffle buffer.

Every sample gets the two views of docs/method.md, section 8, cut from the same RGB image and
flipped together: the SD view (bilinear resize of the shortest side to ``resolution``,
centre crop, [-1, 1]) and the CLIP view (``ssr.image_encoder.clip_preprocess``, the
function inference uses). Then prompt dropout (prompt -> "") and subject dropout (CLIP
input -> zeros in the normalised space, query -> "") so the unconditional subject
embedding that CFG uses is trained too.

Randomness (flip, dropouts) is drawn per sample from a generator seeded with
(seed, epoch, sample identity), so it does not depend on worker count or batch order.
Unreadable images, missing files, empty captions and malformed rows are skipped, logged and
counted in a ``SkipCounter`` that DataLoader workers share with the main process
(``SubjectDataModule.skipped``).
"""
from __future__ import annotations

import io
import json
import logging
import os
import warnings
import zlib
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ssr.image_encoder import clip_preprocess, clip_resize_size, to_pil_rgb

from .sampling import EpochPermutationSampler

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
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


# ----------------------------------------------------------------------------- images


def load_rgb_image(source: Union[str, os.PathLike, Any], what: str, max_pixels: int) -> Image.Image:
    """Open an image file (path or binary file object) as RGB, EXIF orientation applied.

    Transparency is composited over white (``ssr.image_encoder.to_pil_rgb``, as at inference).
    Raises SkipSample("missing_file" | "too_large" | "corrupt_image").
    """
    try:
        with warnings.catch_warnings():
            # We bound the size ourselves below (max_pixels); PIL's own warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size  # header only, nothing decoded yet
                if width * height > max_pixels:
                    raise SkipSample("too_large", f"{what}: {width}x{height} pixels > max_image_pixels={max_pixels}")
                image = ImageOps.exif_transpose(image)  # decodes
                return to_pil_rgb(image, what=what)
    except SkipSample:
        raise
    except FileNotFoundError as exc:
        raise SkipSample("missing_file", f"{what}: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise SkipSample("too_large", f"{what}: {exc}") from exc
    except Exception as exc:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError...)
        raise SkipSample("corrupt_image", f"{what}: {type(exc).__name__}: {exc}") from exc


def resize_shortest_side_center_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize so the shortest side is ``size`` (long side truncated, as torchvision does:
    ``ssr.image_encoder.clip_resize_size``), then take the centred size x size crop at
    torchvision ``CenterCrop``'s offset (half the excess rounded, halves to even; CLIP's
    crop rounds down instead, ``clip_crop_offsets``).

    Done as one resize of the crop's pre-image (PIL's ``box``), which equals resize-then-crop
    to within 1/255 but never materialises the long side: a 100:1 panorama would otherwise
    become a 51200 x 512 intermediate.
    """
    width, height = image.size
    new_width, new_height = clip_resize_size(width, height, size)
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    scale_x, scale_y = new_width / width, new_height / height
    box = (left / scale_x, top / scale_y, (left + size) / scale_x, (top + size) / scale_y)
    return image.resize((size, size), resample=resample, box=box)


def sd_view(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] float32 in [-1, 1] (bilinear, as the reference trainer)."""
    crop = resize_shortest_side_center_crop(image, size, Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return pixels * 2.0 - 1.0


class SampleTransform:
    """(RGB image, caption, query, rng) -> one training sample (see ``collate_samples``).

    The rng is drawn exactly three times per sample, in this order: flip, prompt dropout,
    subject dropout; each fires when a uniform [0, 1) draw is below its probability, so
    probability 0 never and probability 1 always fires.
    """

    def __init__(self, resolution: int, clip_resolution: int, flip_prob: float,
                 prompt_dropout: float, subject_dropout: float):
        self.resolution = resolution
        self.clip_resolution = clip_resolution
        self.thresholds = np.array([flip_prob, prompt_dropout, subject_dropout], dtype=np.float64)

    def draw(self, rng: np.random.Generator) -> Tuple[bool, bool, bool]:
        """-> (flip, drop_prompt, drop_subject) for one sample (the precomputed-shard reader
        draws through this too, so both data paths see the same augmentation per seed)."""
        flip, drop_prompt, drop_subject = (rng.random(3) < self.thresholds).tolist()
        return flip, drop_prompt, drop_subject

    def __call__(self, image: Image.Image, caption: str, query: str, rng: np.random.Generator) -> Dict[str, Any]:
        flip, drop_prompt, drop_subject = self.draw(rng)
        pixel_values = sd_view(image, self.resolution)
        if drop_subject:
            clip_pixel_values = torch.zeros(3, self.clip_resolution, self.clip_resolution)
        else:
            clip_pixel_values = clip_preprocess(image, size=self.clip_resolution)[0]
        if flip:  # both views of the same image, flipped together
            pixel_values = pixel_values.flip(-1)
            clip_pixel_values = clip_pixel_values.flip(-1)
        return {
            "pixel_values": pixel_values,
            "clip_pixel_values": clip_pixel_values,
            "prompt": "" if drop_prompt else caption,
            "query": "" if drop_subject else query,
            "subject_dropped": drop_subject,
        }


def sample_rng(*identity: int) -> np.random.Generator:
    """A generator determined by non-negative ints, e.g. (seed, epoch, row)."""
    return np.random.default_rng(np.random.SeedSequence([int(i) for i in identity]))


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def collate_samples(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack samples into a batch dict.

    pixel_values [B, 3, R, R] float32 in [-1, 1]; clip_pixel_values [B, 3, C, C] float32,
    CLIP-normalised (all zero for dropped subjects); prompt, query, key: list[str] of length
    B (key: the JSONL file_name or "shard/key"); subject_dropped [B] bool.
    """
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "clip_pixel_values": torch.stack([s["clip_pixel_values"] for s in samples]),
        "prompt": [s["prompt"] for s in samples],
        "query": [s["query"] for s in samples],
        "subject_dropped": torch.tensor([s["subject_dropped"] for s in samples], dtype=torch.bool),
        "key": [s["key"] for s in samples],
    }


def _caption_and_query(caption: Any, query: Any, where: str) -> Tuple[str, str]:
    """Validate the text fields of one row; an empty query falls back to the caption."""
    if not isinstance(caption, str):
        raise SkipSample("bad_row", f"{where}: caption must be a string, got {type(caption).__name__}")
    caption = caption.strip()
    if not caption:
        raise SkipSample("empty_caption", f"{where}: empty caption")
    if query is not None and not isinstance(query, str):
        raise SkipSample("bad_row", f"{where}: 'query' must be a string, got {type(query).__name__}")
    query = (query or "").strip()
    return caption, query or caption


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
        caption, query = _caption_and_query(record["text"], record.get("query"), where)
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
        caption, query = _caption_and_query(caption, meta.get("query"), where)
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


# ----------------------------------------------------------------------------- DataModule


class SubjectDataModule(pl.LightningDataModule):
    """Image-caption data for SSR-Encoder training, from a JSONL file or WebDataset shards.

    Batches (see ``collate_samples``): pixel_values [B,3,R,R] in [-1,1], clip_pixel_values
    [B,3,C,C] CLIP-normalised (zeros where the subject was dropped), prompt, query, key
    (list[str]) and subject_dropped [B] bool. Validation batches have no flip and no dropout.

    Resume: the JSONL sampler is a seeded permutation per epoch; this datamodule counts the
    training batches that reached the model (``on_before_batch_transfer``) and saves that
    count in checkpoints, so a resumed run continues with the exact next sample (also with
    a changed number of devices, to within one batch per device). WebDataset streams cannot
    seek: a mid-epoch resume replays that epoch reshuffled with a new seed.

    ``skipped`` / ``val_skipped``: {reason: count} of skipped training / validation samples
    on this device (summed over its workers, kept across resumes); log them from the
    LightningModule (``sync_dist`` with reduce "sum" for all devices).
    """

    def __init__(
        self,
        train_jsonl: Optional[str] = None,
        image_root: Optional[str] = None,
        train_shards: Optional[str] = None,
        train_precomputed: Optional[str] = None,
        train_samples_per_epoch: Optional[int] = None,
        val_jsonl: Optional[str] = None,
        val_image_root: Optional[str] = None,
        val_shards: Optional[str] = None,
        batch_size: int = 16,
        val_batch_size: Optional[int] = None,
        num_workers: int = 4,
        resolution: int = 512,
        clip_resolution: int = 224,
        prompt_dropout: float = 0.8,
        subject_dropout: float = 0.05,
        flip_prob: float = 0.5,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_image_pixels: int = 89_478_485,
    ):
        """
        Args:
            train_jsonl: JSONL training file, one {"file_name", "text", "query" (optional)}
                object per line. Set this or train_shards.
            image_root: Folder that file_name in train_jsonl is relative to (default: the
                JSONL file's folder).
            train_shards: WebDataset shards as img2dataset writes them (key.jpg + key.txt
                [+ key.json]); a brace pattern such as "/data/{00000..01023}.tar", URLs or
                "pipe:" commands; several patterns joined with "::". Set this or train_jsonl.
            train_precomputed: Shards written by ``python -m trainer.precompute`` (VAE latents
                of both flips, CLIP views, optionally text embeddings; precompute.json beside
                them), e.g. "/data/precomputed/{00000..00999}.tar": training then decodes no
                image and runs no VAE. Read like train_shards (streamed, dealt to devices).
                Set one of train_jsonl, train_shards, train_precomputed.
            train_samples_per_epoch: With train_shards or train_precomputed: samples per epoch over all devices;
                the shards are then read round and round and every epoch has the same
                number of batches (needed with more than one device). Unset: one pass over
                the shards is one epoch (one device only).
            val_jsonl: Optional JSONL validation file (same format as train_jsonl).
            val_image_root: Folder for val_jsonl's file names (default: image_root, else the
                val_jsonl file's folder).
            val_shards: Optional WebDataset validation shards (same format as train_shards).
            batch_size: Training samples per batch per device.
            val_batch_size: Validation samples per batch (default: batch_size).
            num_workers: DataLoader worker processes per device.
            resolution: Side of the SD view (shortest side resized, centre crop).
            clip_resolution: Side of the CLIP view (224 for CLIP ViT-L/14).
            prompt_dropout: Probability that the prompt is replaced by "" (reference: 0.8).
            subject_dropout: Probability that the subject is dropped: CLIP input all zero
                (in the normalised space) and query "", which trains the unconditional
                subject embedding used for classifier-free guidance.
            flip_prob: Probability of a horizontal flip (applied to both views together).
            seed: Seed for shuffling, flips and dropouts.
            shuffle_buffer: Shuffle buffer size (samples per worker) for WebDataset shards.
            max_image_pixels: Images with more pixels (width * height) are skipped unread,
                guarding against decompression bombs.
        """
        super().__init__()
        if sum(x is not None for x in (train_jsonl, train_shards, train_precomputed)) > 1:
            raise ValueError("set one of train_jsonl, train_shards, train_precomputed, not several")
        if val_jsonl is not None and val_shards is not None:
            raise ValueError("set either val_jsonl or val_shards, not both")
        for name, p in (("prompt_dropout", prompt_dropout), ("subject_dropout", subject_dropout),
                        ("flip_prob", flip_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        for name, n in (("batch_size", batch_size), ("resolution", resolution),
                        ("clip_resolution", clip_resolution), ("max_image_pixels", max_image_pixels)):
            if n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if train_samples_per_epoch is not None and (train_jsonl is not None or train_samples_per_epoch < 1):
            raise ValueError("train_samples_per_epoch must be a positive number and applies to train_shards / "
                             "train_precomputed only")
        self.save_hyperparameters()
        # Precomputed shards stream like img2dataset shards: the shard logic below serves
        # both, only the per-sample reading differs (trainer.precomputed_reader).
        self.train_precomputed = train_precomputed is not None
        self.precomputed_manifest: Optional[Dict[str, Any]] = None
        self.train_jsonl, self.image_root = train_jsonl, image_root
        self.train_shards = train_precomputed if train_precomputed is not None else train_shards
        self.train_samples_per_epoch = train_samples_per_epoch
        self.val_jsonl, self.val_shards = val_jsonl, val_shards
        self.val_image_root = val_image_root or image_root
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.shuffle_buffer, self.max_image_pixels = shuffle_buffer, max_image_pixels
        self.train_transform = SampleTransform(resolution, clip_resolution, flip_prob, prompt_dropout, subject_dropout)
        self.val_transform = SampleTransform(resolution, clip_resolution, 0.0, 0.0, 0.0)
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None
        self.train_skips = SkipCounter(max_workers=num_workers)
        self.val_skips = SkipCounter(max_workers=num_workers)
        # Training position: batches of `_position_epoch` that reached the model, per device.
        self._position_epoch = 0
        self._batches_consumed = 0
        self._resume_samples_global = 0  # from a checkpoint: samples of that epoch used on all devices
        self._webdataset_restarts = 0
        self._sampler: Optional[EpochPermutationSampler] = None

    # -- devices

    def _devices(self) -> Tuple[int, int]:
        """-> (world size, global rank); (1, 0) without a trainer."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    # -- datasets

    @property
    def skipped(self) -> Dict[str, int]:
        """{reason: count} of training samples skipped so far (reasons: SKIP_REASONS)."""
        return self.train_skips.totals()

    @property
    def val_skipped(self) -> Dict[str, int]:
        """{reason: count} of validation samples skipped so far."""
        return self.val_skips.totals()

    def _jsonl(self, path: str, image_root: Optional[str], train: bool) -> JsonlImageTextDataset:
        return JsonlImageTextDataset(path, image_root, self.train_transform if train else self.val_transform,
                                     self.seed, self.max_image_pixels,
                                     skip_counter=self.train_skips if train else self.val_skips)

    def _shards(self, pattern: str, train: bool) -> WebDatasetImageText:
        world_size, rank = self._devices()
        if train and self.train_precomputed:
            from .precomputed_reader import PrecomputedSampleTransform, PrecomputedShardDataset, precomputed_manifest

            shards = expand_shards(pattern)
            self.precomputed_manifest = precomputed_manifest(shards, self.hparams.resolution,
                                                             self.hparams.clip_resolution)
            dataset = PrecomputedShardDataset(
                shards, PrecomputedSampleTransform(self.train_transform), self.seed,
                shuffle_buffer=self.shuffle_buffer, shuffle=True, num_replicas=world_size, rank=rank,
                cycle=self.train_samples_per_epoch is not None, skip_counter=self.train_skips)
            dataset.restart = self._webdataset_restarts
            return dataset
        dataset = WebDatasetImageText(
            expand_shards(pattern), self.train_transform if train else self.val_transform, self.seed,
            self.max_image_pixels, shuffle_buffer=self.shuffle_buffer, shuffle=train, num_replicas=world_size,
            rank=rank, cycle=train and self.train_samples_per_epoch is not None,
            skip_counter=self.train_skips if train else self.val_skips)
        dataset.restart = self._webdataset_restarts if train else 0
        return dataset

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            if self.train_jsonl is None and self.train_shards is None:
                raise ValueError("SubjectDataModule: set train_jsonl, train_shards or train_precomputed for training")
            if self.train_jsonl is not None:
                self.train_dataset = self._jsonl(self.train_jsonl, self.image_root, train=True)
            else:
                world_size, _ = self._devices()
                if world_size > 1 and self.train_samples_per_epoch is None:
                    raise ValueError("train_samples_per_epoch is required with train_shards on more than one "
                                     "device: a single pass gives devices different batch counts and DDP hangs")
                self.train_dataset = self._shards(self.train_shards, train=True)
        if stage in (None, "fit", "validate"):
            if self.val_jsonl is not None:
                self.val_dataset = self._jsonl(self.val_jsonl, self.val_image_root, train=False)
            elif self.val_shards is not None:
                self.val_dataset = self._shards(self.val_shards, train=False)

    def _loader_kwargs(self, batch_size: int, collate: Callable = collate_samples) -> Dict[str, Any]:
        return dict(batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate,
                    pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        world_size, rank = self._devices()
        dataset = self.train_dataset
        if isinstance(dataset, JsonlImageTextDataset):
            if len(dataset) < world_size * self.batch_size:
                raise ValueError(f"{self.train_jsonl}: {len(dataset)} rows is less than one batch of "
                                 f"{self.batch_size} per device on {world_size} devices")
            self._sampler = EpochPermutationSampler(dataset, num_replicas=world_size, rank=rank, seed=self.seed,
                                                    epoch_fn=self._current_epoch if self.trainer is not None else None)
            self._sampler.resume_at(self._position_epoch, self._resume_samples_global // world_size)
            # Persistent workers are safe: the epoch travels with the sampler's indices.
            return ResumableDataLoader(dataset, sampler=self._sampler, drop_last=True,
                                       persistent_workers=self.num_workers > 0,
                                       **self._loader_kwargs(self.batch_size))
        max_batches = None
        if self.train_samples_per_epoch is not None:
            max_batches = self.train_samples_per_epoch // (world_size * self.batch_size)
            if max_batches < 1:
                raise ValueError(f"train_samples_per_epoch={self.train_samples_per_epoch} is less than one batch "
                                 f"of {self.batch_size} per device on {world_size} devices")
        # Workers are restarted each epoch (not persistent) so they see the new epoch.
        collate = collate_samples
        if self.train_precomputed:
            from .precomputed_reader import collate_precomputed as collate
        return EpochDataLoader(dataset, epoch_fn=self._current_epoch if self.trainer is not None else None,
                               max_batches=max_batches, **self._loader_kwargs(self.batch_size, collate))

    def val_dataloader(self) -> Union[DataLoader, List]:
        if self.val_dataset is None and (self.val_jsonl is not None or self.val_shards is not None):
            self.setup("validate")
        if self.val_dataset is None:
            return []  # no validation data: Lightning skips the validation loop
        # JSONL: a plain sequential loader; Lightning shards it across devices itself.
        return DataLoader(self.val_dataset, shuffle=False, **self._loader_kwargs(self.val_batch_size))

    # -- counting, resume

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches that reach the model (the resume position). Lightning
        calls this after its prefetching, for the batch about to be trained on."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            if epoch != self._position_epoch:
                self._position_epoch, self._batches_consumed, self._resume_samples_global = epoch, 0, 0
            self._batches_consumed += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        world_size, _ = self._devices()
        return {
            "epoch": self._position_epoch,
            # Samples of this epoch used on all devices; the permutation's first this-many
            # entries, whatever the number of devices (the sampler deals it round-robin).
            "samples_consumed": self._resume_samples_global + self._batches_consumed * self.batch_size * world_size,
            "skipped": self.skipped,
            "val_skipped": self.val_skipped,
            "webdataset_restarts": self._webdataset_restarts,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._position_epoch = int(state_dict["epoch"])
        self._resume_samples_global = int(state_dict["samples_consumed"])
        self._batches_consumed = 0
        self.train_skips.restore(state_dict.get("skipped", {}))
        self.val_skips.restore(state_dict.get("val_skipped", {}))
        self._webdataset_restarts = int(state_dict.get("webdataset_restarts", 0))
        if self._resume_samples_global > 0 and (self.train_shards is not None):
            self._webdataset_restarts += 1
        if isinstance(self.train_dataset, WebDatasetImageText):
            self.train_dataset.restart = self._webdataset_restarts
        if self._sampler is not None:  # loader built before the checkpoint was read
            world_size, _ = self._devices()
            self._sampler.resume_at(self._position_epoch, self._resume_samples_global // world_size)
