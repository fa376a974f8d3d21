"""The score step's computation: a bench + a folder of generated images -> one row per image.

Works from the image files alone (any method's images can be scored), laid out as
``<images>/<subject.key>/<NN>_<anything>.<png|jpg|jpeg|webp>`` with NN the prompt index.
Every distinct image and text is embedded once; the metrics are then cosines (``metrics``).

Which metrics a bench gets: DreamBench: CLIP-T, CLIP-I, DINO; the multi-subject bench:
CLIP-T, CLIP-ES, DINO-M (DINO-M only for subjects with a mask) and also CLIP-I and DINO
against the whole multi-subject image. The aesthetic score when its models are given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from PIL import Image

from . import metrics as M
from .benches import Bench, BenchSubject, image_prompt_index
from .loaders import AestheticScorer, ClipEmbedder, DinoEmbedder


@dataclass
class ScoringModels:
    clip: ClipEmbedder
    dino: DinoEmbedder
    aesthetic: Optional[AestheticScorer] = None

    def describe(self) -> Dict[str, str]:
        out = {"clip": self.clip.describe, "dino": self.dino.describe}
        if self.aesthetic is not None:
            out["aesthetic"] = self.aesthetic.describe
        return out


@dataclass
class GeneratedImage:
    subject: BenchSubject
    prompt_index: int
    path: str

    @property
    def prompt(self) -> str:
        return self.subject.prompts[self.prompt_index]


def find_generated_images(bench: Bench, images_dir: str) -> Dict[str, List[GeneratedImage]]:
    """subject key -> its images (sorted by name); subjects without a folder are absent.
    Raises when no image at all is found, or a file names a prompt index the subject lacks."""
    found = {}
    for subject in bench.subjects:
        folder = os.path.join(images_dir, subject.key)
        if not os.path.isdir(folder):
            continue
        items = []
        for name in sorted(os.listdir(folder)):
            index = image_prompt_index(name)
            if index is None:
                continue
            if index >= len(subject.prompts):
                raise ValueError(f"{os.path.join(folder, name)}: prompt index {index} but subject {subject.key!r} has "
                                 f"{len(subject.prompts)} prompts (file names start with the 0-based prompt index)")
            items.append(GeneratedImage(subject, index, os.path.join(folder, name)))
        if items:
            found[subject.key] = items
    if not found:
        example = os.path.join(images_dir, bench.subjects[0].key, "00_seed0.png")
        raise ValueError(f"{images_dir}: no generated images found for this bench (expected files like {example}: "
                         "<subject>/<prompt index>_<anything>.png)")
    return found


def _open(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB") if image.mode not in ("RGB", "RGBA", "LA", "P") else image.copy()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


def _embed_paths(embed, paths: List[str], batch: int = 16) -> Dict[str, torch.Tensor]:
    out = {}
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        for p, e in zip(chunk, embed([_open(p) for p in chunk])):
            out[p] = e
    return out


def score_images(bench: Bench, images_dir: str, models: ScoringModels) -> List[Dict]:
    """-> one dict per generated image: subject, prompt_index, prompt, file (relative to
    ``images_dir``) and the metrics (None where a metric does not apply)."""
    found = find_generated_images(bench, images_dir)
    images = [g for items in found.values() for g in items]
    subjects = [bench.subject(k) for k in found]
    # Each distinct image / text once.
    gen_paths = [g.path for g in images]
    ref_paths = sorted({r for s in subjects for r in s.references})
    clip_img = _embed_paths(models.clip.embed_images, gen_paths + ref_paths)
    dino_img = _embed_paths(models.dino.embed_images, gen_paths + ref_paths)
    texts = sorted({g.prompt for g in images} | {o.label for s in subjects for o in bench.others(s)})
    text_emb = dict(zip(texts, models.clip.embed_texts(texts)))
    masked = {}
    for s in subjects:
        if s.mask:
            with Image.open(s.source_image) as image, Image.open(s.mask) as mask:
                masked[s.key] = models.dino.embed_images([M.masked_subject(image, mask)])
    aesthetic = _aesthetic_batched(models.aesthetic, gen_paths) if models.aesthetic is not None else {}

    rows = []
    for g in images:
        s = g.subject
        ci = clip_img[g.path][None]
        di = dino_img[g.path][None]
        refs_c = torch.stack([clip_img[r] for r in s.references])
        refs_d = torch.stack([dino_img[r] for r in s.references])
        others = bench.others(s)
        row = {
            "subject": s.key, "prompt_index": g.prompt_index, "prompt": g.prompt,
            "file": os.path.relpath(g.path, images_dir),
            "clip_t": float(M.clip_t(ci, text_emb[g.prompt][None])[0]),
            "clip_i": float(M.clip_i(ci, refs_c)[0]),
            "dino": float(M.dino(di, refs_d)[0]),
            "clip_es": float(M.clip_es(ci, torch.stack([text_emb[o.label] for o in others]))[0]) if others else None,
            "dino_m": float(M.dino_m(di, masked[s.key])[0]) if s.key in masked else None,
            "aesthetic": aesthetic.get(g.path),
        }
        rows.append(row)
    return rows


def _aesthetic_batched(scorer: AestheticScorer, paths: List[str], batch: int = 32) -> Dict[str, float]:
    out = {}
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        out.update({p: float(v) for p, v in zip(chunk, scorer.score([_open(p) for p in chunk]))})
    return out


def bench_metrics(bench: Bench) -> List[str]:
    """The metrics the paper's Table 2 reports for this kind of bench."""
    return ["clip_t", "clip_i", "dino"] if bench.kind == "dreambench" else ["clip_t", "clip_es", "dino_m"]
