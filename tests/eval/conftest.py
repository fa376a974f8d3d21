"""Fixtures of the evaluation tests: tiny scoring models in every format (written once per
session) and a small multi-subject bench with images and masks."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.eval import eval_models as em

DREAMBENCH = os.path.join(os.path.dirname(em.ROOT), "shared", "data", "dreambench")


@dataclass
class ModelFiles:
    hf_clip: str
    open_clip_safetensors: str
    open_clip_pt: str
    hf_dino: str
    hf_dinov2: str
    dino_hub: str
    aesthetic_mlp: str
    aesthetic_linear: str
    open_clip_model: object  # the module written to open_clip_* (for independent references)
    dino_hub_model: object


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> ModelFiles:
    root = tmp_path_factory.mktemp("eval_models")
    oc = em.write_open_clip(str(root / "open_clip.safetensors"), seed=1)
    em.write_open_clip(str(root / "open_clip.pt"), seed=1)
    hub = em.write_dino_hub(str(root / "dino_deitsmall16_pretrain.pth"), seed=2)
    em.write_aesthetic_mlp(str(root / "aesthetic_mlp.pth"), seed=3)
    em.write_aesthetic_linear(str(root / "aesthetic_linear.pth"), seed=4)
    return ModelFiles(
        hf_clip=em.write_hf_clip(str(root / "hf_clip"), seed=5), open_clip_safetensors=str(root / "open_clip.safetensors"),
        open_clip_pt=str(root / "open_clip.pt"), hf_dino=em.write_hf_dino(str(root / "hf_dino"), seed=6),
        hf_dinov2=em.write_hf_dinov2(str(root / "hf_dinov2"), seed=7), dino_hub=str(root / "dino_deitsmall16_pretrain.pth"),
        aesthetic_mlp=str(root / "aesthetic_mlp.pth"), aesthetic_linear=str(root / "aesthetic_linear.pth"),
        open_clip_model=oc, dino_hub_model=hub)


def pattern_image(seed: int, size=(96, 80)) -> Image.Image:
    """A distinct image per seed: smooth colour ramps plus a random block pattern."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    phase = rng.uniform(0, 6.28, 3)
    base = 0.5 + 0.5 * np.sin(6 * x * rng.uniform(0.5, 2, 3) + 4 * y * rng.uniform(0.5, 2, 3) + phase)
    blocks = rng.uniform(0, 1, (h // 16 + 1, w // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)[:h, :w]
    return Image.fromarray(((0.6 * base + 0.4 * blocks) * 255).astype(np.uint8))


@dataclass
class MultiBench:
    jsonl: Path
    root: Path


@pytest.fixture
def multi_bench(tmp_path) -> MultiBench:
    """Two rows: 'pets' (dog with a mask, cat with a query only) and 'desk' (three subjects,
    one selected by its mask alone, with row-level prompt templates)."""
    root = tmp_path / "multi"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pattern_image(100, (120, 90)).save(root / "images" / "pets.png")
    pattern_image(101, (100, 100)).save(root / "images" / "desk.jpg")
    left = np.zeros((90, 120), np.uint8)
    left[20:70, 10:60] = 255
    Image.fromarray(left).save(root / "masks" / "pets_dog.png")
    lamp = np.zeros((100, 100), np.uint8)
    lamp[40:90, 50:95] = 255
    Image.fromarray(lamp).save(root / "masks" / "desk_lamp.png")
    rows = [
        {"id": "pets", "image": "images/pets.png", "subjects": [
            {"name": "dog", "query": "the dog", "label": "dog", "mask": "masks/pets_dog.png",
             "prompts": ["a dog on the beach", "a dog in the snow"]},
            {"name": "cat", "query": "the cat", "prompts": ["a cat on a sofa"]}]},
        {"id": "desk", "image": "images/desk.jpg", "prompts": ["a {label} in a kitchen"], "subjects": [
            {"name": "mug", "query": "the mug", "label": "mug"},
            {"name": "lamp", "mask": "masks/desk_lamp.png", "label": "lamp", "prompts": ["a lamp at night"]},
            {"name": "book", "query": "the book", "label": "book"}]},
    ]
    jsonl = root / "bench.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    return MultiBench(jsonl, root)
