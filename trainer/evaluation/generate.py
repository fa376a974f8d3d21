"""The generate step: SSR-Encoder images for every (subject, prompt, seed) of a bench.

Uses the trainer's sampling path (``SSRTrainingCore.generate``: DDIM, classifier-free
guidance with the unconditional subject), the paper's settings by default (30 steps, CFG
7.5). Each image is made alone with its own generator seeded by its seed, so an image
depends only on (subject, prompt, seed) and not on what else was generated: a resumed or
partial run gives the same pixels. Finished images are skipped; files are written to a
temporary name and renamed, so an interrupted write never counts as finished.

Layout: ``<out>/<subject.key>/<NN>_seed<S>.png`` and ``<out>/generation.json`` (the
settings; a rerun with other settings into the same folder is refused, so one folder never
mixes two settings).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch
from PIL import Image

from ssr.image_encoder import clip_preprocess, mask_logit_bias

from .benches import Bench, BenchSubject, generated_file_name

MANIFEST = "generation.json"


@dataclass
class GenerationSettings:
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: int = 30
    guidance_scale: float = 7.5
    subject_scale: float = 1.0
    height: int = 512
    width: int = 512
    mask_weight: float = 5.0


@dataclass
class GenerationJob:
    subject: BenchSubject
    prompt_index: int
    seed: int
    path: str

    @property
    def prompt(self) -> str:
        return self.subject.prompts[self.prompt_index]


def generation_jobs(bench: Bench, out_dir: str, seeds: List[int]) -> List[GenerationJob]:
    """Every (subject, prompt, seed), in bench order."""
    return [GenerationJob(s, i, seed, os.path.join(out_dir, s.key, generated_file_name(i, seed)))
            for s in bench.subjects for i in range(len(s.prompts)) for seed in seeds]


def check_manifest(out_dir: str, record: dict) -> None:
    """Write the settings on the first run; refuse a later run whose settings differ."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        changed = [k for k in record if k != "seeds" and previous.get(k) != record[k]]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {record[k]!r}" for k in changed)
            raise ValueError(f"{path}: this folder holds images made with other settings ({details}); "
                             "use another output folder or the same settings")
        record = dict(record, seeds=sorted(set(previous.get("seeds", [])) | set(record["seeds"])))
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def save_image(pixels: torch.Tensor, path: str) -> None:
    """pixels [3, H, W] in [0, 1] -> PNG, written atomically (temporary name, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = (pixels.permute(1, 2, 0).float().cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    tmp = path + ".part"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def subject_inputs(subject: BenchSubject, mask_weight: float):
    """-> (clip_pixel_values [1, 3, 224, 224], logit_bias [1, 257] or None) for the subject."""
    with Image.open(subject.source_image) as image:
        image.load()
        pixels = clip_preprocess(image)
        size = image.size
    bias = None
    if subject.mask:
        with Image.open(subject.mask) as mask:
            bias = mask_logit_bias(mask, mask_weight, what=f"mask {subject.mask}", image_size=size)[None]
    return pixels, bias


@torch.no_grad()
def run_generation(core, bench: Bench, out_dir: str, settings: GenerationSettings, record: Optional[dict] = None,
                   progress: bool = True, on_image: Optional[Callable[[GenerationJob], None]] = None) -> dict:
    """Generate the images that are not there yet. ``core``: an ``SSRTrainingCore`` on its
    device. -> {"generated": n, "skipped": n, "total": n}."""
    from tqdm import tqdm

    check_manifest(out_dir, dict(record or {}, **asdict(settings), bench=os.path.abspath(bench.source)))
    jobs = generation_jobs(bench, out_dir, settings.seeds)
    todo = [j for j in jobs if not os.path.isfile(j.path)]
    device = next(core.unet.parameters()).device
    cache = {}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="generate", unit="img", disable=not progress)
    for job in todo:
        if job.subject.key not in cache:
            cache = {job.subject.key: subject_inputs(job.subject, settings.mask_weight)}  # one subject at a time
        pixels, bias = cache[job.subject.key]
        generator = torch.Generator(device=device).manual_seed(job.seed)
        image = core.generate(pixels.to(device), [job.subject.query], [job.prompt], generator, settings.height,
                              settings.width, steps=settings.steps, guidance_scale=settings.guidance_scale,
                              subject_scale=settings.subject_scale,
                              logit_bias=None if bias is None else bias.to(device))
        save_image(image[0], job.path)
        if on_image is not None:
            on_image(job)
        bar.update(1)
    bar.close()
    return {"generated": len(todo), "skipped": len(jobs) - len(todo), "total": len(jobs)}


def build_core(pretrained_model: str, clip_vision: str, ssr_weights: str, sd_config_dir: Optional[str] = None,
               device: str = "cpu", dtype: str = "float32", clip_expect_width: Optional[int] = 1024):
    """An ``SSRTrainingCore`` for sampling from files: SD1.x checkpoint/folder, CLIP ViT-L/14
    vision weights, SSR weights (any format ``ssr.load_ssr_weights`` reads)."""
    from ssr import load_clip_image_encoder, load_ssr_weights
    from ssr.layers import FAMILIES

    from ..core import SSRTrainingCore
    from ..sd_loading import load_stable_diffusion

    sd = load_stable_diffusion(pretrained_model, sd_config_dir)
    image_encoder = load_clip_image_encoder(clip_vision, expect_width=clip_expect_width)
    family = "sd1" if FAMILIES.get(sd.text_encoder.config.hidden_size) == "sd1" else None
    weights = load_ssr_weights(ssr_weights, expect_family=family)
    core = SSRTrainingCore(sd, image_encoder, weights).eval().to(device)
    core.set_frozen_dtype(getattr(torch, dtype))
    return core
