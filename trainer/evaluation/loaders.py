"""Scoring models from the files users have, loaded without running pickled code.

- CLIP (``load_clip``): a Hugging Face ``CLIPModel`` folder (config.json + weights, e.g.
  openai/clip-vit-base-patch32), or an open_clip / OpenAI-layout state dict (.safetensors,
  .bin, .pt, .pth; architecture read from the tensor shapes, or named with ``arch`` for
  open_clip models that are not OpenAI-shaped, e.g. GELU instead of QuickGELU).
- DINO (``load_dino``): a Hugging Face folder of DINO (``ViTModel``, e.g. facebook/dino-vits16)
  or DINOv2 (``Dinov2Model``), or DINO's torch.hub file (``dino_deitsmall16_pretrain.pth``:
  the ViT backbone's state dict: cls_token, pos_embed, patch_embed.proj, blocks.N.*, norm).
- The LAION aesthetic head (``load_aesthetic_head``): the improved-aesthetic-predictor MLP
  (``sac+logos+ava1-l14-linearMSE.pth``: layers.{0,2,4,6,7}) or the older linear head
  (``sa_0_4_vit_l_14_linear.pth``: weight [1, 768], bias [1]).

Every file goes through ``ssr.files.read_state_dict`` (safetensors, or ``torch.load`` with
``weights_only=True``); Hugging Face folders are read with ``from_pretrained`` on local files
only. Each embedder returns L2-normalised float32 features, ``[N, D]``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssr.files import WeightFileError, read_state_dict
from ssr.image_encoder import clip_crop_offsets, clip_resize_size, to_pil_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelFileError(WeightFileError):
    """A scoring model's file or folder is missing or of the wrong kind (names the file and
    what was expected)."""


# ----------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocess:
    """Resize the shortest side to ``resize`` (bicubic), centre-crop ``crop`` x ``crop``,
    scale to [0, 1], normalise. CLIP: 224/224 with CLIP's mean/std (CLIPImageProcessor);
    DINO: 256/224 with ImageNet's mean/std (DINO's own evaluation transform).

    ``torchvision_crop``: where the crop starts when the excess is odd. torchvision's
    CenterCrop (DINO's and open_clip's transforms) rounds half the excess
    (``int(round(excess / 2))``), CLIPImageProcessor (Hugging Face folders) floors it."""

    resize: int
    crop: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    torchvision_crop: bool = False

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """images (any size/mode) -> [N, 3, crop, crop] float32."""
        out = []
        for image in images:
            rgb = to_pil_rgb(image)
            w, h = clip_resize_size(rgb.width, rgb.height, self.resize)
            rgb = rgb.resize((w, h), resample=Image.BICUBIC)
            if self.torchvision_crop:
                left, top = int(round((w - self.crop) / 2.0)), int(round((h - self.crop) / 2.0))
            else:
                left, top = clip_crop_offsets(w, h, self.crop)
            rgb = rgb.crop((left, top, left + self.crop, top + self.crop))
            out.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1))
        batch = torch.stack(out)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (batch - mean) / std


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _features(out) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output object."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ----------------------------------------------------------------------------- embedders

class ClipEmbedder:
    """Image and text embeddings of one CLIP model (projected, L2-normalised).

    ``describe``: what was loaded, printed in every report."""

    def __init__(self, image_fn, text_fn, preprocess: Preprocess, describe: str, device: torch.device):
        self._image_fn, self._text_fn = image_fn, text_fn
        self.preprocess, self.describe, self.device = preprocess, describe, device

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """-> [N, D] on the CPU."""
        parts = [_normalise(self._image_fn(self.preprocess(images[i:i + batch_size]).to(self.device))).cpu()
                 for i in range(0, len(images), batch_size)]
        return torch.cat(parts)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """-> [N, D] on the CPU."""
        parts = [_normalise(self._text_fn(list(texts[i:i + batch_size]))).cpu() for i in range(0, len(texts), batch_size)]
        return torch.cat(parts)


class DinoEmbedder:
    """CLS features of a DINO / DINOv2 ViT after its final LayerNorm, L2-normalised."""

    def __init__(self, forward_fn, preprocess: Preprocess, describe: str, device: torch.device):
        self._forward, self.preprocess, self.describe, self.device = forward_fn, preprocess, describe, device

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """-> [N, D] on the CPU."""
        parts = [_normalise(self._forward(self.preprocess(images[i:i + batch_size]).to(self.device))).cpu()
                 for i in range(0, len(images), batch_size)]
        return torch.cat(parts)


class AestheticScorer:
    """LAION aesthetic score: head(normalised CLIP ViT-L/14 image embedding) -> [N]."""

    def __init__(self, clip: ClipEmbedder, head: nn.Module, describe: str):
        self.clip, self.head, self.describe = clip, head, describe

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        embeddings = self.clip.embed_images(images)
        return self.head(embeddings).squeeze(-1)

    @torch.no_grad()
    def score_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [N, D] (already L2-normalised) -> [N]."""
        return self.head(embeddings.float()).squeeze(-1)


# ----------------------------------------------------------------------------- helpers

def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelFileError(f"{folder}: a model folder needs a Hugging Face config.json (not found)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not a readable JSON config ({e})") from None


def _check_hf_weights(folder: str) -> None:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        raise ModelFileError(f"{folder}: no weights in the Hugging Face folder (expected one of {', '.join(names)})")


def _from_pretrained(cls, folder: str):
    # use_safetensors=None: safetensors when present; a .bin goes through transformers'
    # weights_only loading. Local files only: nothing is downloaded.
    try:
        return cls.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{folder}: cannot load as {cls.__name__} ({str(e).splitlines()[0]})") from e


def _strip_prefixes(state: Dict[str, torch.Tensor], prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


# ----------------------------------------------------------------------------- CLIP

def load_clip(path: str, arch: Optional[str] = None, device=None) -> ClipEmbedder:
    """A CLIP model with both towers (CLIP-T needs the text tower)."""
    device = _device(device)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: CLIP model not found (expected a Hugging Face CLIPModel folder or an "
                             "open_clip/OpenAI state dict file)")
    if os.path.isdir(path):
        return _load_hf_clip(path, device)
    return _load_open_clip_file(path, arch, device)


def _load_hf_clip(folder: str, device: torch.device) -> ClipEmbedder:
    from transformers import CLIPModel

    config = _read_config(folder)
    kind = config.get("model_type")
    if kind != "clip":
        hint = " (a vision-only folder has no text tower, which CLIP-T needs)" if kind == "clip_vision_model" else ""
        raise ModelFileError(f"{folder}: expected a Hugging Face CLIPModel folder (config.json model_type 'clip'), "
                             f"got model_type {kind!r}{hint}")
    _check_hf_weights(folder)
    model = _from_pretrained(CLIPModel, folder).to(device)
    tokenize = _hf_tokenizer(folder, model.config.text_config.max_position_embeddings)
    size = int(model.config.vision_config.image_size)
    preprocess = Preprocess(size, size, *_hf_mean_std(folder, CLIP_MEAN, CLIP_STD))

    def image_fn(pixels):
        return _features(model.get_image_features(pixel_values=pixels))

    def text_fn(texts):
        return _features(model.get_text_features(input_ids=tokenize(texts).to(device)))

    v = model.config.vision_config
    describe = (f"CLIP (Hugging Face CLIPModel) {folder}: vision width {v.hidden_size}, {v.num_hidden_layers} layers, "
                f"patch {v.patch_size}, {size} px, projection {model.config.projection_dim}")
    return ClipEmbedder(image_fn, text_fn, preprocess, describe, device)


def _hf_mean_std(folder: str, mean, std):
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        return tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return tuple(mean), tuple(std)


def _hf_tokenizer(folder: str, context_length: int):
    """The folder's CLIP tokenizer when it has one, else CLIP's BPE vocabulary shipped with
    open_clip (the same ids). -> texts -> [N, context_length] ids."""
    if any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "vocab.json")):
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        return lambda texts: tokenizer(list(texts), padding="max_length", truncation=True,
                                       max_length=context_length, return_tensors="pt").input_ids
    import open_clip

    return lambda texts: open_clip.tokenize(list(texts), context_length=context_length)


def _open_clip_state(path: str) -> Dict[str, torch.Tensor]:
    state, _ = read_state_dict(path)
    state = _strip_prefixes(state, ("module.", "model."))
    if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        if any(k.startswith("vision_model.") for k in state):
            raise ModelFileError(f"{path}: this is a Hugging Face CLIP state dict; pass the model folder "
                                 "(config.json + weights) instead of the file")
        raise ModelFileError(f"{path}: expected a CLIP state dict with both towers in the open_clip/OpenAI layout "
                             "(visual.conv1.weight, token_embedding.weight, transformer.resblocks.N.*); "
                             f"found keys like {sorted(state)[:3]}")
    return state


def _openai_shaped_clip(path: str, state: Dict[str, torch.Tensor]):
    """open_clip's CLIP with the architecture read from the shapes of an OpenAI-layout state
    dict (ViT towers, 64-dim heads, QuickGELU), built and kept in fp32 (open_clip's own
    builder for these files goes through fp16, which loses precision)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    def count(prefix: str) -> int:
        return len({k.split(".")[len(prefix.split("."))] for k in state if k.startswith(prefix + ".")})

    try:
        patch = state["visual.conv1.weight"].shape[-1]
        grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
        vision = CLIPVisionCfg(layers=count("visual.transformer.resblocks"), width=state["visual.conv1.weight"].shape[0],
                               patch_size=patch, image_size=grid * patch, head_width=64)
        text = CLIPTextCfg(context_length=state["positional_embedding"].shape[0],
                           vocab_size=state["token_embedding.weight"].shape[0], width=state["ln_final.weight"].shape[0],
                           heads=state["ln_final.weight"].shape[0] // 64, layers=count("transformer.resblocks"))
        model = CLIP(state["text_projection"].shape[1], vision, text, quick_gelu=True)
        model.load_state_dict({k: v for k, v in state.items()
                               if k not in ("input_resolution", "context_length", "vocab_size")}, strict=True)
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise ModelFileError(f"{path}: the shapes do not form an OpenAI-style CLIP ({str(e).splitlines()[0]}); "
                             "name the open_clip architecture with --clip-arch") from e
    return model


def _load_open_clip_file(path: str, arch: Optional[str], device: torch.device) -> ClipEmbedder:
    import open_clip

    state = _open_clip_state(path)
    if arch:
        model = open_clip.create_model(arch, pretrained=None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelFileError(f"{path}: the weights do not fit open_clip architecture {arch!r} "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        describe = f"CLIP (open_clip {arch}) {path}"
    else:
        model = _openai_shaped_clip(path, state)
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        describe = (f"CLIP (open_clip/OpenAI state dict, QuickGELU) {path}: vision width {width}, patch {patch}, "
                    f"projection {state['text_projection'].shape[1]}")
    model = model.float().eval().to(device)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    context = int(model.context_length)

    def text_fn(texts):
        return model.encode_text(open_clip.tokenize(list(texts), context_length=context).to(device))

    preprocess = Preprocess(size, size, CLIP_MEAN, CLIP_STD, torchvision_crop=True)
    return ClipEmbedder(model.encode_image, text_fn, preprocess, describe, device)


# ----------------------------------------------------------------------------- DINO

def load_dino(path: str, device=None) -> DinoEmbedder:
    """DINO / DINOv2: a Hugging Face folder or DINO's torch.hub backbone state dict."""
    device = _device(device)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: DINO model not found (expected a Hugging Face ViTModel/Dinov2Model folder "
                             "or DINO's torch.hub .pth, e.g. dino_deitsmall16_pretrain.pth)")
    if os.path.isdir(path):
        return _load_hf_dino(path, device)
    return _load_dino_hub_file(path, device)


def _load_hf_dino(folder: str, device: torch.device) -> DinoEmbedder:
    config = _read_config(folder)
    kind = config.get("model_type")
    if kind == "vit":
        from transformers import ViTModel as cls
    elif kind == "dinov2":
        from transformers import Dinov2Model as cls
    else:
        raise ModelFileError(f"{folder}: expected a DINO (model_type 'vit') or DINOv2 (model_type 'dinov2') "
                             f"Hugging Face folder, got model_type {kind!r}")
    _check_hf_weights(folder)
    if kind == "vit":
        from transformers import ViTModel

        try:  # DINO checkpoints carry no pooler; do not create a random one
            model = ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{folder}: cannot load as ViTModel ({str(e).splitlines()[0]})") from e
    else:
        model = _from_pretrained(cls, folder)
    model = model.to(device)
    # DINOv2 is trained at 224 crops too; its position embeddings are interpolated for any size.
    crop = 224 if kind == "dinov2" else int(model.config.image_size)
    preprocess = Preprocess(round(crop * 256 / 224), crop, *_hf_mean_std(folder, IMAGENET_MEAN, IMAGENET_STD),
                            torchvision_crop=True)

    def forward(pixels):
        return model(pixel_values=pixels).last_hidden_state[:, 0]

    c = model.config
    name = "DINO (Hugging Face ViTModel)" if kind == "vit" else "DINOv2 (Hugging Face Dinov2Model)"
    describe = f"{name} {folder}: width {c.hidden_size}, {c.num_hidden_layers} layers, patch {c.patch_size}, CLS token"
    return DinoEmbedder(forward, preprocess, describe, device)


DINO_HUB_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight")


def _load_dino_hub_file(path: str, device: torch.device) -> DinoEmbedder:
    import timm

    state, _ = read_state_dict(path)
    state = _strip_prefixes(state, ("module.", "backbone."))
    missing = [k for k in DINO_HUB_KEYS if k not in state]
    if missing:
        raise ModelFileError(f"{path}: expected DINO's torch.hub ViT backbone state dict (keys {', '.join(DINO_HUB_KEYS)}); "
                             f"missing {missing}, found keys like {sorted(state)[:3]}")
    if any(".ls1." in k for k in state):
        raise ModelFileError(f"{path}: this is a DINOv2 torch.hub file; use the Hugging Face DINOv2 folder "
                             "(facebook/dinov2-*) instead")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid * grid != state["pos_embed"].shape[1] - 1 or width % 64:
        raise ModelFileError(f"{path}: pos_embed {tuple(state['pos_embed'].shape)} / width {width} do not form a "
                             "square-grid ViT with 64-dim heads (DINO ViT-S/B)")
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    # DINO's ViT is timm's VisionTransformer (same module names): pre-norm blocks, qkv bias,
    # LayerNorm eps 1e-6, GELU; features = final norm's CLS token (num_classes=0, no head).
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 64,
        mlp_ratio=mlp, qkv_bias=True, num_classes=0, global_pool="token")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(f"{path}: does not fit a DINO ViT (missing {result.missing_keys[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
    model = model.float().eval().to(device)
    size = grid * patch
    preprocess = Preprocess(round(size * 256 / 224), size, IMAGENET_MEAN, IMAGENET_STD, torchvision_crop=True)
    describe = f"DINO (torch.hub state dict) {path}: width {width}, {depth} layers, patch {patch}, CLS token"
    return DinoEmbedder(model, preprocess, describe, device)


# ----------------------------------------------------------------------------- aesthetic head

class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear
    layers at the indices of its state dict (dropouts between them in training)."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, width] -> [N, 1]."""
        return self.layers(x)


def load_aesthetic_head(path: str) -> Tuple[nn.Module, str]:
    """-> (head: [N, D] normalised embeddings -> [N, 1], description)."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: aesthetic head not found (expected the LAION improved-aesthetic-predictor "
                             ".pth, e.g. sac+logos+ava1-l14-linearMSE.pth, or the linear sa_0_4_vit_l_14_linear.pth)")
    state, _ = read_state_dict(path)
    state = _strip_prefixes(state, ("module.",))
    if "layers.0.weight" in state:
        head = AestheticMLP(state["layers.0.weight"].shape[1])
        kind = "MLP"
    elif set(state) == {"weight", "bias"} and state["weight"].ndim == 2 and state["weight"].shape[0] == 1:
        head = nn.Linear(state["weight"].shape[1], 1)
        kind = "linear"
    else:
        raise ModelFileError(f"{path}: expected the LAION aesthetic head: MLP keys layers.{{0,2,4,6,7}}.weight/bias or "
                             f"a linear layer (weight [1, 768], bias [1]); found keys like {sorted(state)[:4]}")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: the aesthetic head's shapes do not fit ({str(e).splitlines()[-1].strip()})") from e
    width = head.layers[0].in_features if kind == "MLP" else head.in_features
    return head.float().eval(), f"LAION aesthetic head ({kind}, {width}-dim input) {path}"


def load_aesthetic(head_path: str, clip_path: str, clip_arch: Optional[str] = None, device=None) -> AestheticScorer:
    """The aesthetic head on top of its CLIP (ViT-L/14: 768-dim image embeddings)."""
    clip = load_clip(clip_path, clip_arch, device)
    head, describe = load_aesthetic_head(head_path)
    probe = clip.embed_images([Image.new("RGB", (8, 8))])
    width = head.layers[0].in_features if isinstance(head, AestheticMLP) else head.in_features
    if probe.shape[1] != width:
        raise ModelFileError(f"{head_path}: the head takes {width}-dim CLIP embeddings but {clip_path} gives "
                             f"{probe.shape[1]}-dim ones (the LAION heads need CLIP ViT-L/14: --aesthetic-clip)")
    return AestheticScorer(clip, head.to("cpu"), f"{describe} on {clip.describe}")


def describe_models(models: Dict[str, object]) -> List[str]:
    return [f"{name}: {m.describe}" for name, m in models.items() if m is not None]
