"""Loading CLIP vision weights from the files users have, into ``ClipImageEncoder``.

Recognised from the keys (never the file name):
- Hugging Face ``CLIPVisionModel`` / ``CLIPModel`` (folder with config.json, or single file;
  keys ``vision_model.*`` or without that prefix; q/k/v split),
- open_clip state dicts (``visual.*`` or bare ``conv1.weight``...; fused ``in_proj``),
- OpenAI's ``ViT-L-14.pt`` after conversion: it is a TorchScript archive, which every loader
  here refuses (loading one runs code from the file); ``python -m ssr.convert
  --trust-torchscript`` turns it, once and on purpose, into a safetensors file with its
  open_clip-layout ``visual.*`` tensors.
Text-tower and projection keys are ignored.
"""
from __future__ import annotations

import json
import os
import re
from typing import Collection, Dict, Optional, Tuple

import torch

from .files import WeightFileError, read_state_dict
from .image_encoder import ClipImageEncoder, VisionConfig

HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face model folder's weight file
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _strip(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def detect_clip_layout(keys: Collection[str]) -> Tuple[str, str]:
    """``keys``: a state dict or its tensor names -> (layout, prefix): layout "hf",
    "open_clip" or "unknown", prefix to strip from the keys."""
    for prefix in ("vision_model.", "model.vision_model.", ""):
        if prefix + "embeddings.patch_embedding.weight" in keys:
            return "hf", prefix
    for prefix in ("visual.", "model.visual.", ""):
        if prefix + "conv1.weight" in keys:
            return "open_clip", prefix
    return "unknown", ""


def hf_to_open_clip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF CLIP vision keys (prefix stripped) -> open_clip ``VisionTransformer`` keys."""
    out = {
        "class_embedding": sd["embeddings.class_embedding"],
        "conv1.weight": sd["embeddings.patch_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
    }
    simple = {"pre_layrnorm": "ln_pre", "post_layernorm": "ln_post"}
    for hf, oc in simple.items():
        for p in ("weight", "bias"):
            if f"{hf}.{p}" in sd:
                out[f"{oc}.{p}"] = sd[f"{hf}.{p}"]
    per_layer = {
        "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    }
    layers = sorted({int(m.group(1)) for k in sd if (m := _HF_LAYER.match(k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([sd[src + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            for hf, oc in per_layer.items():
                out[dst + f"{oc}.{p}"] = sd[src + f"{hf}.{p}"]
    return out


def infer_vision_config(sd: Dict[str, torch.Tensor], heads: Optional[int] = None) -> VisionConfig:
    """Architecture from open_clip-layout tensors. Heads cannot be read from weights:
    CLIP uses 64-dim heads (ViT-L/14: 1024/64 = 16) unless a config says otherwise."""
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    output_dim = sd["proj"].shape[1] if "proj" in sd else 768
    return VisionConfig(
        image_size=grid * patch, patch_size=patch, width=width, layers=layers,
        heads=heads or max(1, width // 64), mlp_ratio=mlp / width, output_dim=output_dim,
    )


def _read_hf_heads(config_path: str) -> Optional[int]:
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg = cfg.get("vision_config", cfg)
    if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise WeightFileError(f"{config_path}: hidden_act is {cfg['hidden_act']!r}; SSR-Encoder needs OpenAI CLIP (quick_gelu)")
    return cfg.get("num_attention_heads")


def hf_weight_file(folder: str) -> Optional[str]:
    """The weight file of a Hugging Face model folder (``HF_WEIGHT_NAMES``, in that order), or None."""
    return next((os.path.join(folder, n) for n in HF_WEIGHT_NAMES if os.path.isfile(os.path.join(folder, n))), None)


def resolve_clip_path(path: str) -> Tuple[str, Optional[str]]:
    """A file or a Hugging Face folder -> (weight file, config.json or None)."""
    if os.path.isdir(path):
        weights = hf_weight_file(path)
        if weights is None:
            raise WeightFileError(f"{path}: folder has none of {', '.join(HF_WEIGHT_NAMES)}")
        config = os.path.join(path, "config.json")
        return weights, config if os.path.isfile(config) else None
    return path, None


def load_clip_state_dict(path: str) -> Tuple[Dict[str, torch.Tensor], VisionConfig]:
    """Any supported CLIP vision file/folder -> (open_clip-layout visual state dict, config)."""
    weight_path, config_path = resolve_clip_path(path)
    raw, _ = read_state_dict(weight_path)
    layout, prefix = detect_clip_layout(raw)
    if layout == "unknown":
        sample = ", ".join(sorted(raw)[:4])
        raise WeightFileError(
            f"{weight_path}: not a CLIP vision checkpoint (no 'vision_model.embeddings.patch_embedding.weight' "
            f"or 'visual.conv1.weight'; first keys: {sample})")
    sd = _strip(raw, prefix) if prefix else raw
    try:
        sd = hf_to_open_clip(sd) if layout == "hf" else sd
        heads = _read_hf_heads(config_path) if config_path else None
        config = infer_vision_config(sd, heads)
    except KeyError as e:
        raise WeightFileError(f"{weight_path}: incomplete CLIP vision checkpoint, missing {e}") from e
    return sd, config


def load_clip_image_encoder(path: str, expect_width: Optional[int] = 1024) -> ClipImageEncoder:
    """Build a ``ClipImageEncoder`` from a CLIP vision file/folder (fp32, CPU, eval, frozen).

    ``expect_width`` guards against CLIP-H/G files (1280/1664 wide), which load fine but do not
    fit SSR weights trained on ViT-L/14; pass None to skip the check (tests, other encoders).
    """
    sd, config = load_clip_state_dict(path)
    if expect_width is not None and config.width != expect_width:
        raise WeightFileError(
            f"{path}: CLIP vision width {config.width} ({config.layers} layers); SSR-Encoder needs "
            f"OpenAI CLIP ViT-L/14 (width {expect_width}). Files like clip_h.pth / clip_g.pth do not fit")
    if config.layers % config.num_scales:
        raise WeightFileError(f"{path}: {config.layers} layers cannot be split into {config.num_scales} scales")
    encoder = ClipImageEncoder(config)
    wanted = encoder.visual.state_dict()
    missing = [k for k in wanted if k not in sd and not k.startswith(("ln_post", "proj"))]
    if missing:
        raise WeightFileError(f"{path}: CLIP vision checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in wanted.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        raise WeightFileError(f"{path}: tensor shapes do not match a CLIP vision tower: {bad[:3]}")
    encoder.visual.load_state_dict({k: sd[k] for k in wanted if k in sd}, strict=False)
    return encoder
