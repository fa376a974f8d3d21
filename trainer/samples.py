"""From one RGB image and its caption to one training sample, and from samples to a batch.

Every sample gets the two views of docs/method.md, section 8, cut from the same RGB image and
flipped together: the SD view (bilinear resize of the shortest side to ``resolution``,
centre crop, [-1, 1]) and the CLIP view (``ssr.image_encoder.clip_preprocess``, the
function inference uses). Then prompt dropout (prompt -> "") and subject dropout (CLIP
input -> zeros in the normalised space, query -> "") so the unconditional subject
embedding that CFG uses is trained too.

Randomness (flip, dropouts) is drawn per sample from a generator seeded with
(seed, epoch, sample identity) (``sample_rng``), so it does not depend on worker count or
batch order. Also here: opening image files (``load_rgb_image``) and checking the text
fields of a row (``caption_and_query``), shared by both data sources
(``trainer.jsonl_dataset``, ``trainer.webdataset_stream``).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ssr.image_encoder import clip_preprocess, clip_resize_size, to_pil_rgb

from .skips import SkipSample


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


def caption_and_query(caption: Any, query: Any, where: str) -> Tuple[str, str]:
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
