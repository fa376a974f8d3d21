"""Request pieces for the real-host tests: reference images in every form a user sends, and
the extension's API args."""
from __future__ import annotations

import base64
import io
import os

import numpy as np
from PIL import Image

TITLE = "SSR-Encoder"
TINY_SSR = "tiny_ssr.safetensors"
FULL_SSR = "full_ssr.safetensors"
OFFICIAL_PAIR = "official_tiny/pytorch_model.bin"
REEXPORT_PAIR = "reexport_tiny/ssr_aligner.safetensors"
CLIP = "clip_vision/tiny-clip-vit"

DREAMBENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                          "shared", "data", "dreambench")


def reference_image(seed: int = 0, w: int = 96, h: int = 72) -> Image.Image:
    """A smooth random RGB picture (structure for the tiny CLIP to see, no noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def box_mask(w: int = 96, h: int = 72, box=(20, 10, 70, 60)) -> Image.Image:
    a = np.zeros((h, w), np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(a)


def encode(image: Image.Image, fmt: str = "PNG", data_url: bool = False, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/{fmt.lower()};base64,{text}" if data_url else text


def decoded(text: str) -> Image.Image:
    """What a server decoding ``text`` gets (for the reference computation)."""
    if text.startswith("data:"):
        text = text.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(text)))


def ssr_unit(*subjects, scale=0.65, start=0.0, end=1.0, model=TINY_SSR, clip_model=CLIP, enabled=True) -> dict:
    """One SSR-Encoder API unit; subjects: dicts with image (base64), query, mask, weight."""
    return {"enabled": enabled, "scale": scale, "start": start, "end": end, "model": model,
            "clip_model": clip_model, "subjects": list(subjects)}


def alwayson(unit: dict, **others) -> dict:
    scripts = {TITLE: {"args": [unit]}}
    scripts.update(others)
    return scripts
