"""Training data for the SSR-Encoder trainer: the LightningDataModule (``SubjectDataModule``).

Two sources of (image, caption[, query]) pairs:

* a JSONL file, one ``{"file_name": ..., "text": ..., "query": ...}`` object per line
  ("query" optional), images under ``image_root`` (the reference trainer's format);
  map-style, resumable mid-epoch to the exact sample (``trainer.jsonl_dataset``);
* WebDataset tar shards as img2dataset writes them (``00000.tar`` holding ``key.jpg`` +
  ``key.txt`` + ``key.json``), streamed shard by shard with a shuffle buffer
  (``trainer.webdataset_stream``).

Every sample gets the two views of docs/method.md, section 8, cut from the same RGB image and
flipped together: the SD view (bilinear resize of the shortest side to ``resolution``,
centre crop, [-1, 1]) and the CLIP view (``ssr.image_encoder.clip_preprocess``, the
function inference uses). Then prompt dropout (prompt -> "") and subject dropout (CLIP
input -> zeros in the normalised space, query -> "") so the unconditional subject
embedding that CFG uses is trained too (``trainer.samples``).

Randomness (flip, dropouts) is drawn per sample from a generator seeded with
(seed, epoch, sample identity), so it does not depend on worker count or batch order.
Unreadable images, missing files, empty captions and malformed rows are skipped, logged and
counted in a ``SkipCounter`` (``trainer.skips``) that DataLoader workers share with the main
process (``SubjectDataModule.skipped``). The loaders are in ``trainer.loaders``, the JSONL
sampler in ``trainer.sampling``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .jsonl_dataset import JsonlImageTextDataset
from .loaders import EpochDataLoader, ResumableDataLoader
from .samples import SampleTransform, collate_samples
from .sampling import EpochPermutationSampler
from .skips import SkipCounter
from .webdataset_stream import WebDatasetImageText, expand_shards


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
