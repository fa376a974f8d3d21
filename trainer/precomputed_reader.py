"""Reading precomputed shards for training (layout: ``trainer.precomputed_format``).

Streamed like img2dataset shards (``WebDatasetImageText``: shards dealt to devices and
workers, shuffle buffer, cycling, per-sample randomness from (seed, epoch, pass, shard,
key)), but each sample is turned into a training sample without decoding an image or
running the VAE: the flip picks one of the two stored latent distributions and flips the
CLIP view, the dropouts act as on raw data (``SampleTransform.draw``, the same draws).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ssr.image_encoder import clip_normalize

from .precomputed_format import decode_sample, read_manifest
from .samples import SampleTransform
from .skips import SkipCounter, SkipSample
from .webdataset_stream import WebDatasetImageText


class PrecomputedSampleTransform:
    """(decoded precomputed record, rng) -> one training sample (see ``collate_precomputed``).

    Draws flip, prompt dropout and subject dropout through ``SampleTransform.draw``, so a
    seed gives the same augmentation as on raw data."""

    def __init__(self, transform: SampleTransform):
        self.transform = transform

    def __call__(self, record: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
        flip, drop_prompt, drop_subject = self.transform.draw(rng)
        view = 1 if flip else 0
        if drop_subject:
            clip_pixel_values = torch.zeros((3,) + tuple(record["clip_pixels"].shape[-2:]))
        else:
            clip_pixel_values = clip_normalize(record["clip_pixels"])
            if flip:
                clip_pixel_values = clip_pixel_values.flip(-1)
        sample = {
            "latent_mean": record["latent_mean"][view],
            "latent_std": record["latent_std"][view],
            "clip_pixel_values": clip_pixel_values,
            "prompt": "" if drop_prompt else record["caption"],
            "query": "" if drop_subject else record["query"],
            "subject_dropped": drop_subject,
        }
        if "caption_states" in record:
            sample["prompt_states"] = record["caption_states"]
            sample["query_states"] = record["query_states"]
        return sample


def collate_precomputed(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack precomputed samples into a batch dict.

    latent_mean, latent_std [B, 4, R/8, R/8] (stored dtype); clip_pixel_values [B, 3, C, C]
    float32, CLIP-normalised (all zero for dropped subjects); prompt, query, key: list[str];
    subject_dropped [B] bool; with stored text embeddings also prompt_states, query_states
    [B, 77, D] (used by the core for rows whose text is not "")."""
    batch = {
        "latent_mean": torch.stack([s["latent_mean"] for s in samples]),
        "latent_std": torch.stack([s["latent_std"] for s in samples]),
        "clip_pixel_values": torch.stack([s["clip_pixel_values"] for s in samples]),
        "prompt": [s["prompt"] for s in samples],
        "query": [s["query"] for s in samples],
        "subject_dropped": torch.tensor([s["subject_dropped"] for s in samples], dtype=torch.bool),
        "key": [s["key"] for s in samples],
    }
    with_states = ["prompt_states" in s for s in samples]
    if any(with_states):
        if not all(with_states):
            raise ValueError("a batch mixes precomputed samples with and without text embeddings; precompute all "
                             "shards with the same --text_embeddings setting")
        batch["prompt_states"] = torch.stack([s["prompt_states"] for s in samples])
        batch["query_states"] = torch.stack([s["query_states"] for s in samples])
    return batch


class PrecomputedShardDataset(WebDatasetImageText):
    """Training samples from precomputed shards (see the module docstring)."""

    def __init__(self, shards: Sequence[str], transform: PrecomputedSampleTransform, seed: int,
                 shuffle_buffer: int = 1000, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 cycle: bool = False, skip_counter: Optional[SkipCounter] = None):
        super().__init__(shards, transform, seed, max_image_pixels=0, shuffle_buffer=shuffle_buffer,
                         shuffle=shuffle, num_replicas=num_replicas, rank=rank, cycle=cycle,
                         skip_counter=skip_counter)

    def sample_from_raw(self, raw: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
        try:
            record = decode_sample(raw)
        except Exception as exc:  # noqa: BLE001 - a damaged member (bad JSON, truncated tensors) is one skipped row
            raise SkipSample("bad_row", f"{raw.get('__url__')} key {raw.get('__key__')}: not a precomputed "
                                        f"sample ({type(exc).__name__}: {exc})") from exc
        return self.transform(record, rng)


def precomputed_manifest(shards: List[str], resolution: int, clip_resolution: int) -> Dict[str, Any]:
    """The manifest beside local precomputed shards, checked against the data settings.
    Raises ValueError with what to do."""
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    if not local:
        raise ValueError("train_precomputed: the shards' precompute.json is read from their folder, so the shards "
                         "must be local files")
    folders = sorted({os.path.dirname(os.path.abspath(s)) for s in local})
    manifests = []
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest is None:
            raise ValueError(f"{folder}: no precompute.json beside the shards; train_precomputed takes the output "
                             "of python -m trainer.precompute (for img2dataset shards use train_shards)")
        manifests.append(manifest)
    manifest = manifests[0]
    for key in ("resolution", "clip_resolution", "vae", "text_encoder", "latent_dtype"):
        if any(m.get(key) != manifest.get(key) for m in manifests[1:]):
            raise ValueError(f"train_precomputed: the shard folders {folders} were precomputed with different {key}")
    if not manifest.get("complete"):
        raise ValueError(f"{folders[0]}: precompute did not finish (precompute.json says complete: false); run "
                         "the same python -m trainer.precompute command again to finish it")
    for key, wanted in (("resolution", resolution), ("clip_resolution", clip_resolution)):
        if manifest.get(key) != wanted:
            raise ValueError(f"train_precomputed: shards were precomputed at {key} {manifest.get(key)}, the data "
                             f"settings ask for {wanted}; set data.{key}: {manifest.get(key)} or precompute again")
    return manifest
