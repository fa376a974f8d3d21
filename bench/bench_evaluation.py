"""Images scored per second by the score step, at the default models' real sizes.

    python bench/bench_evaluation.py                  # CPU, 24 images of 512x512, CLIP ViT-B/32 + DINO ViT-S/16
    python bench/bench_evaluation.py --device cuda --images 256

No weights can be downloaded here, so the models are the real architectures with random
weights, written in the formats users have (an OpenAI-layout CLIP ViT-B/32 state dict and
DINO's torch.hub ViT-S/16 file); speed does not depend on the values. Scored: DreamBench
layout with 4 subjects (4 references each), 4 seeds per prompt as in DreamBench (one prompt
text per 4 images), generated PNGs of ``--size`` px, CLIP-T, CLIP-I and DINO, everything the score step does except the reports (decoding, preprocessing,
both models, texts, references). Prints images/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.evaluation.benches import Bench, BenchSubject  # noqa: E402
from trainer.evaluation.loaders import load_clip, load_dino  # noqa: E402
from trainer.evaluation.scoring import ScoringModels, score_images  # noqa: E402


def write_models(folder: str) -> tuple:
    """CLIP ViT-B/32 (OpenAI layout) and DINO ViT-S/16 (torch.hub layout), random weights."""
    import open_clip
    import timm

    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    clip_path = os.path.join(folder, "ViT-B-32.pt")
    torch.save(clip.state_dict(), clip_path)
    dino = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, qkv_bias=True, num_classes=0)
    dino_path = os.path.join(folder, "dino_deitsmall16_pretrain.pth")
    torch.save(dino.state_dict(), dino_path)
    return clip_path, dino_path


def write_bench(folder: str, images: int, size: int, subjects: int = 4, references: int = 4) -> Bench:
    rng = np.random.default_rng(0)
    bench = Bench("dreambench", folder)
    per_subject = max(1, images // subjects)
    for s in range(subjects):
        refs = []
        for r in range(references):
            path = os.path.join(folder, "refs", f"s{s}_{r}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            refs.append(path)
        key = f"subject{s}"
        # DreamBench's proportions: 4 seeds per prompt, so one prompt text per 4 images.
        prompts = [f"a subject{s} on the beach number {i}" for i in range((per_subject + 3) // 4)]
        bench.subjects.append(BenchSubject(key, refs[0], refs, key, key, prompts))
        os.makedirs(os.path.join(folder, "gen", key))
        for i in range(per_subject):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(folder, "gen", key, f"{i // 4:02d}_seed{i % 4}.png"))
    return bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=512, help="generated/reference image size in px")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        clip_path, dino_path = write_models(folder)
        bench = write_bench(folder, args.images, args.size)
        models = ScoringModels(load_clip(clip_path, device=args.device), load_dino(dino_path, device=args.device))
        n = len(bench.subjects) * max(1, args.images // len(bench.subjects))
        score_images(bench, os.path.join(folder, "gen"), models)  # warm-up (allocations, kernels)
        start, cpu_start = time.perf_counter(), time.process_time()
        rows = score_images(bench, os.path.join(folder, "gen"), models)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert len(rows) == n
    print(f"device {args.device}, {torch.get_num_threads()} threads: {n} generated images of {args.size}x{args.size} "
          f"(+ {4 * len(bench.subjects)} references) scored with CLIP ViT-B/32 + DINO ViT-S/16 (CLIP-T, CLIP-I, DINO) "
          f"in {seconds:.2f} s = {n / seconds:.2f} images/s")
    # On a shared machine wall time depends on the other jobs; CPU time does not (much).
    print(f"CPU time {cpu_seconds:.2f} s = {n / cpu_seconds:.2f} images per CPU-second "
          f"(x{torch.get_num_threads()} threads = {n * torch.get_num_threads() / cpu_seconds:.2f} images/s when the "
          "cores are not shared)")


if __name__ == "__main__":
    main()
