"""The metrics, as functions of L2-normalised embeddings (docs/evaluation.md defines each).

All values are plain cosines in [-1, 1] (not x100, not clipped at 0), averaged as stated:

- CLIP-T(g)  = cos(E_img(g), E_txt(prompt of g))
- CLIP-I(g)  = mean over references r of cos(E_img(g), E_img(r))
- DINO(g)    = mean over references r of cos(D(g), D(r))             D = DINO CLS feature
- CLIP-ES(g) = mean over the other subjects B of g's multi-subject image of
               cos(E_img(g), E_txt(label of B))                      lower = more exclusive
- DINO-M(g)  = cos(D(g), D(masked reference))   reference: pixels outside the subject's
               mask painted white, cropped to the mask's bounding box; g: whole image
- aesthetic(g) = head(E_L14(g))                                      LAION head, 1-10 scale
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from ssr.image_encoder import mask_to_array, to_pil_rgb

METRICS = ("clip_t", "clip_i", "dino", "clip_es", "dino_m", "aesthetic")
LOWER_IS_BETTER = {"clip_es"}
TITLES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", "clip_es": "CLIP-ES", "dino_m": "DINO-M",
          "aesthetic": "Aesthetic"}


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [N, D], b [N, D], both L2-normalised -> [N]: cos(a_i, b_i)."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a * b).sum(-1)


def mean_cosine_to_set(a: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """a [N, D], refs [R, D] (L2-normalised) -> [N]: mean over r of cos(a_i, refs_r)."""
    return (a @ refs.T).mean(-1)


def clip_t(image_emb: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
    """image_emb [N, D], prompt_emb [N, D] (row i: image i's prompt) -> [N]."""
    return paired_cosine(image_emb, prompt_emb)


def clip_i(image_emb: torch.Tensor, reference_emb: torch.Tensor) -> torch.Tensor:
    """image_emb [N, D], reference_emb [R, D] (one subject's references) -> [N]."""
    return mean_cosine_to_set(image_emb, reference_emb)


def dino(image_feat: torch.Tensor, reference_feat: torch.Tensor) -> torch.Tensor:
    """image_feat [N, D], reference_feat [R, D] (DINO CLS features) -> [N]."""
    return mean_cosine_to_set(image_feat, reference_feat)


def clip_es(image_emb: torch.Tensor, other_label_emb: torch.Tensor) -> torch.Tensor:
    """image_emb [N, D] (images of subject A), other_label_emb [K, D] (text of each other
    subject B of A's multi-subject image, K >= 1) -> [N]."""
    return mean_cosine_to_set(image_emb, other_label_emb)


def dino_m(image_feat: torch.Tensor, masked_reference_feat: torch.Tensor) -> torch.Tensor:
    """image_feat [N, D], masked_reference_feat [1, D] -> [N]."""
    return mean_cosine_to_set(image_feat, masked_reference_feat)


def masked_subject(image: Image.Image, mask: Image.Image, fill=(255, 255, 255)) -> Image.Image:
    """The reference side of DINO-M: pixels where the mask is not > 0.5 set to ``fill``
    (white), then cropped to the mask's bounding box, so DINO sees the subject alone. The
    mask is resized (nearest) to the image when their sizes differ."""
    rgb = to_pil_rgb(image)
    m = mask_to_array(mask, "mask")
    if m.shape != (rgb.height, rgb.width):
        m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize(rgb.size, Image.NEAREST)) / 255.0
    keep = m > 0.5
    if not keep.any():
        raise ValueError("the subject mask is empty (no pixel > 0.5): DINO-M needs the subject painted white")
    pixels = np.asarray(rgb).copy()
    pixels[~keep] = fill
    rows, cols = np.nonzero(keep)
    return Image.fromarray(pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1])


def summarize(rows: List[Dict[str, Optional[float]]], metrics=METRICS) -> Dict[str, Optional[float]]:
    """Mean of each metric over the rows that have it (None when none has)."""
    out = {}
    for name in metrics:
        values = [r[name] for r in rows if r.get(name) is not None]
        out[name] = float(np.mean(values)) if values else None
    return out
