"""The layout of precomputed training shards (written by ``python -m trainer.precompute``).

A precomputed shard is a plain tar (WebDataset conventions: members ``<key>.<ext>`` grouped
by key, the key free of dots) with two members per sample:

``<key>.json``         {"caption": str, "query": str, "source": the row's file name or shard key}
``<key>.safetensors``  latent_mean, latent_std  [2, 4, R/8, R/8] float16 or float32: the VAE's
                       latent distribution of the SD view, index 0 as is, 1 flipped
                       (a VAE latent is not the flip of the other, so both are kept);
                       clip_pixels  [3, C, C] uint8: the CLIP view before normalisation
                       (flipping commutes with normalisation, so one suffices);
                       optional caption_states, query_states [77, D]: the SD text encoder's
                       last hidden states of caption and query.

Tensors travel as safetensors bytes: reading a shard never unpickles anything.

Beside the shards, ``precompute.json`` (``MANIFEST_NAME``) records what they were made
with: resolutions, VAE and text-encoder identities, the source, the sample counts. The
trainer checks it against its own models and settings before training.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

FORMAT_NAME = "ssr-precomputed"
FORMAT_VERSION = 1
MANIFEST_NAME = "precompute.json"
TENSOR_MEMBER = "safetensors"
TEXT_MEMBER = "json"
# Settings that must match between a resumed precompute run and the shards already written,
# and that the trainer compares with its own.
SETTINGS = ("format", "version", "resolution", "clip_resolution", "vae", "text_encoder", "latent_dtype",
            "source", "image_root", "samples_per_shard")


def encode_sample(caption: str, query: str, source: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, bytes]:
    """One sample -> {member extension: bytes} (see the module docstring for the tensors)."""
    from safetensors.torch import save

    text = json.dumps({"caption": caption, "query": query, "source": source}, ensure_ascii=False)
    return {TEXT_MEMBER: text.encode("utf-8"),
            # Own storage each: caption and query states may be one tensor (query = caption).
            TENSOR_MEMBER: save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})}


def decode_sample(members: Dict[str, bytes]) -> Dict[str, Any]:
    """{member extension: bytes} -> {"caption", "query", "source", tensor name: tensor}.
    Raises KeyError / ValueError for a sample that is not in this layout."""
    from safetensors.torch import load

    record = json.loads(members[TEXT_MEMBER].decode("utf-8"))
    if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
        raise ValueError("the .json member is not a {'caption', 'query', 'source'} object")
    tensors = load(members[TENSOR_MEMBER])
    for name in ("latent_mean", "latent_std", "clip_pixels"):
        if name not in tensors:
            raise ValueError(f"the .safetensors member lacks {name!r}")
    return {**tensors, "caption": record["caption"], "query": record.get("query") or record["caption"],
            "source": record.get("source", "")}


def read_manifest(folder: str) -> Optional[Dict[str, Any]]:
    """The manifest in ``folder``, or None when there is none."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a precompute manifest (format {manifest.get('format')!r})")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: precomputed shards of format version {manifest['version']}, newer than this "
                         f"trainer reads ({FORMAT_VERSION}); update the trainer")
    return manifest


def write_manifest(folder: str, manifest: Dict[str, Any]) -> None:
    from ssr.files import write_atomically

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)

    write_atomically(os.path.join(folder, MANIFEST_NAME), write)


def settings_mismatch(manifest: Dict[str, Any], wanted: Dict[str, Any], keys=SETTINGS) -> Dict[str, tuple]:
    """{setting: (in the manifest, wanted)} for the settings among ``keys`` that differ."""
    return {k: (manifest.get(k), wanted.get(k)) for k in keys if k in wanted and manifest.get(k) != wanted.get(k)}
