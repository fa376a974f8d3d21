"""CLIP ViT-L/14 image features at six scales, and CLIP's image/mask preprocessing.

The vision tower is open_clip's ``VisionTransformer`` (OpenAI CLIP with QuickGELU). We walk
its residual blocks ourselves to collect the hidden states after blocks 4, 8, ..., 24
(after ``ln_pre``, before ``ln_post``), because ``forward_intermediates`` and similar
APIs do not exist in open_clip 2.20.0, which the WebUI pins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class VisionConfig:
    """Architecture of a CLIP vision tower; defaults are OpenAI CLIP ViT-L/14 (224 px)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 768
    num_scales: int = 6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """CLS + grid*grid patch tokens (257 for ViT-L/14 at 224 px)."""
        return self.grid * self.grid + 1

    @property
    def scale_layers(self) -> List[int]:
        """1-based block indices whose outputs are the multi-scale features (4, 8, ..., 24)."""
        step = self.layers // self.num_scales
        return [step * (k + 1) for k in range(self.num_scales)]


def build_vision_tower(config: VisionConfig) -> torch.nn.Module:
    """An open_clip ``VisionTransformer`` with QuickGELU, randomly initialised."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(
        layers=config.layers,
        width=config.width,
        head_width=config.width // config.heads,
        mlp_ratio=config.mlp_ratio,
        patch_size=config.patch_size,
        image_size=config.image_size,
    )
    return _build_vision_tower(config.output_dim, cfg, quick_gelu=True)


class ClipImageEncoder(torch.nn.Module):
    """Frozen CLIP vision tower returning the multi-scale hidden states z_1..z_6."""

    def __init__(self, config: VisionConfig = VisionConfig()):
        super().__init__()
        self.config = config
        self.visual = build_vision_tower(config)
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:
        """pixel_values: [B, 3, S, S] CLIP-normalised -> list of num_scales tensors [B, T, width].

        T = config.num_tokens (257 for ViT-L/14). Blocks after the last scale are not run.
        """
        v = self.visual
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        # open_clip <= 2.23 runs its transformer sequence-first; newer releases batch-first.
        batch_first = getattr(v.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)
        wanted = set(self.config.scale_layers)
        states = []
        for index, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x)
            if index in wanted:
                states.append(x if batch_first else x.transpose(0, 1))
            if index == self.config.scale_layers[-1]:
                break
        return states


# ----------------------------------------------------------------------------- preprocessing


def to_pil_rgb(image: ImageLike, what: str = "image") -> Image.Image:
    """Any PIL image, HxW / HxWxC numpy array (uint8 or float in [0,1]) or [C,H,W] tensor
    in [0,1] -> RGB PIL image. Transparent pixels are composited over white, so a cut-out
    subject on a transparent background is seen on white rather than on black."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu().float()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
            raise ValueError(f"{what}: expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {tuple(a.shape)}")
        if a.dtype != np.uint8:
            a = np.clip(np.asarray(a, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        image = Image.fromarray(a)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what}: expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{what}: image is empty ({image.width}x{image.height})")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shortest_and_crop(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """CLIP geometry: shortest side -> size (long side truncated as torchvision does), then
    the centred size x size crop."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), resample=resample)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def clip_preprocess(images: Union[ImageLike, Sequence[ImageLike]], size: int = 224) -> torch.Tensor:
    """Images of any size and mode -> [B, 3, size, size] float32, CLIP-normalised.

    Bicubic resize of the shortest side, centre crop, scale to [0,1], normalise with CLIP's
    mean/std: the preprocessing the released weights were trained with.
    """
    if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
        images = [images]
    out = []
    for i, image in enumerate(images):
        rgb = resize_shortest_and_crop(to_pil_rgb(image, what=f"image {i}"), size)
        out.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1))
    if not out:
        raise ValueError("clip_preprocess: no images given")
    batch = torch.stack(out)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def unconditional_pixels(batch: int = 1, size: int = 224) -> torch.Tensor:
    """The unconditional CLIP input: zeros in the *normalised* space, [batch, 3, size, size]."""
    return torch.zeros(batch, 3, size, size)


def mask_to_array(mask: ImageLike, what: str = "mask") -> np.ndarray:
    """A mask as PIL (any mode; RGB sketch masks are white where painted), numpy or tensor
    -> float32 HxW array in [0,1]. uint8 inputs are scaled by 1/255."""
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA"):
            # A sketch layer: painted where opaque or bright.
            rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32) / 255.0
            return np.maximum(rgba[..., :3].max(axis=2) * rgba[..., 3], 0.0)
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{what}: expected a PIL image, numpy array or tensor, got {type(mask).__name__}")
    a = mask
    if a.ndim == 3:
        a = a.max(axis=2) if a.shape[2] in (1, 3, 4) else a.max(axis=0)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D mask (HxW, or HxWxC), got shape {tuple(mask.shape)}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return a.astype(np.float32)


def mask_logit_bias(mask: ImageLike, weight: float = 5.0, grid: int = 16, what: str = "mask") -> torch.Tensor:
    """The aligner's logit bias for a mask query -> [grid*grid + 1] float32 (CLS first).

    The mask is binarised (> 0.5), given the same centre crop as the image (the centred
    square of its shortest side) so it selects what the user drew, resized bilinearly to
    grid x grid (no antialiasing, align_corners=False, as the released weights saw), and
    mapped patch-wise to ``weight * (m * (1 + weight) - 1)``; the CLS token gets +1.
    """
    m = (mask_to_array(mask, what) > 0.5).astype(np.float32)
    if m.sum() == 0:
        raise ValueError(f"{what} is empty: paint over the subject (white = selected) or clear the mask to use the text query")
    h, w = m.shape
    side = min(h, w)
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    m = m[top:top + side, left:left + side]
    if m.sum() == 0:
        raise ValueError(
            f"{what} lies entirely outside the centred square of the image that CLIP sees; "
            "crop the reference image so the subject is in its centre")
    t = torch.from_numpy(np.ascontiguousarray(m))[None, None]
    small = F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False).flatten()
    bias = weight * (small * (1.0 + weight) - 1.0)
    return torch.cat([torch.ones(1), bias])


def mask_logit_biases(masks: Union[torch.Tensor, Sequence[ImageLike]], weight: float = 5.0, grid: int = 16) -> torch.Tensor:
    """Batched ``mask_logit_bias``: a [B, H, W] tensor/array or a list of masks of any sizes
    -> [B, grid*grid + 1]."""
    if isinstance(masks, (torch.Tensor, np.ndarray)) and masks.ndim == 3:
        masks = list(masks)
    return torch.stack([mask_logit_bias(m, weight, grid, what=f"mask {i}") for i, m in enumerate(masks)])
