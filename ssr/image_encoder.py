"""CLIP ViT-L/14 image features at six scales, and CLIP's image/mask preprocessing.

The vision tower is open_clip's ``VisionTransformer`` (OpenAI CLIP with QuickGELU). We walk
its residual blocks ourselves to collect the hidden states after blocks 4, 8, ..., 24
(after ``ln_pre``, before ``ln_post``), because ``forward_intermediates`` and similar
APIs do not exist in open_clip 2.20.0, which the WebUI pins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
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


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grey PIL image (modes "I;16*", or "I" as Pillow reads 16-bit PNGs) -> "L",
    scaled by 1/257 (65535 -> 255), where ``convert`` would clip everything above 255 to white.
    Other modes are returned unchanged."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")


def has_alpha(image: Image.Image) -> bool:
    """An alpha band, or a transparent colour/palette index (``info["transparency"]``)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_pil_rgb(image: ImageLike, what: str = "image") -> Image.Image:
    """Any PIL image, HxW / HxWxC numpy array (uint8 or float in [0,1]) or [C,H,W] tensor
    in [0,1] -> RGB PIL image. Transparent pixels are composited over white (as
    CLIPImageProcessor's RGB conversion does), so a cut-out subject on a transparent
    background is seen on white rather than on black. 16-bit grey is scaled to 8 bits."""
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
    image = to_eight_bit(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def clip_resize_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """CLIPImageProcessor's resize target (width, height): the shortest side becomes ``size``,
    the long side ``int(size * long / short)`` (truncated)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def clip_crop_offsets(resized_width: int, resized_height: int, size: int) -> Tuple[int, int]:
    """(left, top) of CLIPImageProcessor's centre crop in the resized image: half the excess,
    rounded down (``(length - size) // 2``)."""
    return (resized_width - size) // 2, (resized_height - size) // 2


def clip_crop_box(width: int, height: int, size: int) -> Tuple[float, float, float, float]:
    """The square CLIP sees, in the original image's pixel coordinates (left, top, right,
    bottom; continuous, so fractional where the resize is not an integer scale)."""
    new_w, new_h = clip_resize_size(width, height, size)
    left, top = clip_crop_offsets(new_w, new_h, size)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def resize_shortest_and_crop(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """CLIPImageProcessor's geometry: Pillow resize of the shortest side to ``size`` (long side
    truncated; ``reducing_gap`` off), then the size x size crop at ``clip_crop_offsets``."""
    new_w, new_h = clip_resize_size(image.width, image.height, size)
    image = image.resize((new_w, new_h), resample=resample)
    left, top = clip_crop_offsets(new_w, new_h, size)
    return image.crop((left, top, left + size, top + size))


def clip_view_pixels(image: ImageLike, size: int = 224, what: str = "image") -> torch.Tensor:
    """One image -> its CLIP view before normalisation: [3, size, size] uint8 (RGB,
    transparency over white, bicubic shortest-side resize, centre crop)."""
    rgb = resize_shortest_and_crop(to_pil_rgb(image, what=what), size)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 CLIP views [..., 3, S, S] -> float32 [..., 3, S, S], CLIP-normalised: rescale by
    1/255 in float64, then float32 (the processor's rescale, bit for bit), then mean/std."""
    scaled = (pixels.to(torch.float64) * (1.0 / 255.0)).to(torch.float32)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (scaled - mean) / std


def clip_preprocess(images: Union[ImageLike, Sequence[ImageLike]], size: int = 224) -> torch.Tensor:
    """Images of any size and mode -> [B, 3, size, size] float32, CLIP-normalised.

    The preprocessing the released weights were trained with, transformers'
    CLIPImageProcessor (openai/clip-vit-large-patch14): RGB (transparency over white), bicubic
    resize of the shortest side, centre crop, rescale by 1/255, normalise with CLIP's mean/std.
    """
    if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
        images = [images]
    views = [clip_view_pixels(image, size, what=f"image {i}") for i, image in enumerate(images)]
    if not views:
        raise ValueError("clip_preprocess: no images given")
    return clip_normalize(torch.stack(views))


def unconditional_pixels(batch: int = 1, size: int = 224) -> torch.Tensor:
    """The unconditional CLIP input: zeros in the *normalised* space, [batch, 3, size, size]."""
    return torch.zeros(batch, 3, size, size)


def mask_to_array(mask: ImageLike, what: str = "mask") -> np.ndarray:
    """A mask as PIL (any mode; RGB sketch masks are white where painted; 16-bit grey is
    scaled), numpy or tensor -> float32 HxW array in [0,1]. uint8 inputs are scaled by 1/255."""
    if isinstance(mask, Image.Image):
        mask = to_eight_bit(mask)
        if has_alpha(mask):
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


def _bilinear_rows(length: int, start: float, end: float, out: int) -> np.ndarray:
    """[out, length] weights sampling ``[start, end)`` (continuous pixel coordinates) at ``out``
    evenly spaced cell centres with linear interpolation: for a whole axis (start 0, end
    length) exactly ``F.interpolate(mode="bilinear", align_corners=False)`` without antialias."""
    positions = start + (np.arange(out) + 0.5) * (end - start) / out - 0.5
    positions = np.clip(positions, 0.0, length - 1)
    lo = np.floor(positions).astype(np.int64)
    hi = np.minimum(lo + 1, length - 1)
    frac = positions - lo
    weights = np.zeros((out, length), np.float64)
    np.add.at(weights, (np.arange(out), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out), hi), frac)
    return weights


def mask_logit_bias(mask: ImageLike, weight: float = 5.0, grid: int = 16, what: str = "mask",
                    image_size: Optional[Tuple[int, int]] = None, size: int = 224) -> torch.Tensor:
    """The aligner's logit bias for a mask query -> [grid*grid + 1] float32 (CLS first).

    The mask is binarised (> 0.5) and sampled bilinearly (no antialiasing, as
    ``F.interpolate(align_corners=False)``) at the centres of the grid x grid patches of the
    square CLIP sees: the same crop as the image (``clip_crop_box``), so grid cell (i, j) lies
    under CLIP patch (i, j). ``image_size`` (width, height) is the reference image's size when
    the mask has another resolution; by default the mask's own. Patch-wise the value m maps to
    ``weight * (m * (1 + weight) - 1)``; the CLS token gets +1.
    """
    m = (mask_to_array(mask, what) > 0.5).astype(np.float64)
    if m.sum() == 0:
        raise ValueError(f"{what} is empty: paint over the subject (white = selected) or clear the mask to use the text query")
    h, w = m.shape
    image_w, image_h = image_size if image_size is not None else (w, h)
    left, top, right, bottom = clip_crop_box(image_w, image_h, size)
    sx, sy = w / image_w, h / image_h
    left, right, top, bottom = left * sx, right * sx, top * sy, bottom * sy
    inside = m[int(np.floor(top)):int(np.ceil(bottom)), int(np.floor(left)):int(np.ceil(right))]
    if inside.sum() == 0:
        raise ValueError(
            f"{what} lies entirely outside the centred square of the image that CLIP sees; "
            "crop the reference image so the subject is in its centre")
    small = _bilinear_rows(h, top, bottom, grid) @ m @ _bilinear_rows(w, left, right, grid).T
    small = torch.from_numpy(small.astype(np.float32)).flatten()
    bias = weight * (small * (1.0 + weight) - 1.0)
    return torch.cat([torch.ones(1), bias])


def mask_logit_biases(masks: Union[torch.Tensor, Sequence[ImageLike]], weight: float = 5.0, grid: int = 16) -> torch.Tensor:
    """Batched ``mask_logit_bias``: a [B, H, W] tensor/array or a list of masks of any sizes
    -> [B, grid*grid + 1]."""
    if isinstance(masks, (torch.Tensor, np.ndarray)) and masks.ndim == 3:
        masks = list(masks)
    return torch.stack([mask_logit_bias(m, weight, grid, what=f"mask {i}") for i, m in enumerate(masks)])
