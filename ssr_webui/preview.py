"""Selection preview: the query's token-to-patch attention drawn over the reference image.

The overlay shows the centred square that CLIP sees (shortest side resized, centre crop),
so what lies outside it, and cannot be selected, is visible too.
"""
from __future__ import annotations

import base64
import io
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ssr.image_encoder import resize_shortest_and_crop, to_pil_rgb
from ssr.subject_encoder import upsample_heatmap

# Colour ramp for the heatmap (dark blue -> cyan -> yellow -> red), interpolated linearly.
_RAMP = np.array([[0, 0, 80], [0, 90, 200], [0, 200, 200], [250, 220, 0], [230, 20, 0]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8 along the colour ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def heatmap_overlay(image, heatmap: torch.Tensor, size: int = 336, alpha: float = 0.55,
                    mask: Optional[np.ndarray] = None) -> Image.Image:
    """image (any ImageLike), heatmap [g, g] in [0, 1] -> RGB overlay of size x size on the
    CLIP crop. A mask (HxW, [0, 1]) is outlined in white where it was drawn."""
    crop = resize_shortest_and_crop(to_pil_rgb(image), size)
    heat = upsample_heatmap(heatmap.float()[None], (size, size))[0].clamp(0, 1).numpy()
    base = np.asarray(crop, dtype=np.float32)
    out = base * (1 - alpha) + colorize(heat).astype(np.float32) * alpha
    if mask is not None:
        m = resize_shortest_and_crop(Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)), size, Image.BILINEAR)
        m = np.asarray(m, dtype=np.float32) / 255.0 > 0.5
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255.0
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
