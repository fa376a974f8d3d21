"""Benchmark of the training data path: raw images vs precomputed shards (prints numbers).

    python bench/bench_data.py                          # loader samples/s on CPU, 0/1/2 workers
    python bench/bench_data.py --train-step --workers 8 # + the full training step on CUDA (SD1.5 size)

Loader part (CPU): a JSONL file of synthetic JPEGs (default 1024x768, decoded, resized to
the 512 px SD view and the 224 px CLIP view, flipped, dropouts: ``SubjectDataModule`` with
``train_jsonl``) against precomputed shards of the same number of samples at SD1.5 shapes
(latents [2, 4, 64, 64] fp16, CLIP view uint8, optionally text states [77, 768]:
``SubjectDataModule`` with ``train_precomputed``; the shard contents are random, reading
cost depends only on sizes). Each loader is timed over whole batches after a warm-up batch;
"per worker" divides by the number of worker processes (0 workers: the main process).
The raw path still has to run the VAE per step on the GPU; the shard path does not.

Training part (``--train-step``, CUDA): SD1.5-size models with random weights, batch 16,
bf16 autocast with bf16 frozen models (as ``frozen_dtype: auto``; ``--frozen_dtype float32``
keeps them fp32), AdamW on the trainable
weights: (a) the step alone on one batch already on the GPU, VAE encode included (raw) or
not (precomputed latents); (b) the step fed by each loader with ``--workers`` processes,
batches copied to the GPU as training does: samples/s end to end. The loader is not the
bottleneck when (b) matches (a).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer.data import SubjectDataModule  # noqa: E402
from trainer.precomputed_format import FORMAT_NAME, FORMAT_VERSION, write_manifest  # noqa: E402
from trainer.precomputed_writer import ShardWriter  # noqa: E402

CAPTIONS = ["a photo of a corgi running on the beach", "a red car parked in a snowy city street at night",
            "a woman wearing a straw hat in a field of sunflowers", "a small cat sleeping on a wooden chair"]


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs visible, torch threads {torch.get_num_threads()}"


def write_raw_images(folder: str, count: int, width: int, height: int) -> str:
    """count JPEGs (smooth random content, quality 90) + train.jsonl -> the JSONL path."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)  # photo-like, compresses like one
        name = f"{i:05d}.jpg"
        image.save(os.path.join(folder, name), quality=90)
        rows.append(json.dumps({"file_name": name, "text": CAPTIONS[i % len(CAPTIONS)], "query": "the subject"}))
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    return path


def write_precomputed(folder: str, count: int, per_shard: int, resolution: int, text_dim: int) -> str:
    """Shards of count random samples at the given sizes + a complete manifest -> shard pattern."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    h = resolution // 8
    shards = (count + per_shard - 1) // per_shard
    for s in range(shards):
        with ShardWriter(os.path.join(folder, f"{s:05d}.tar"), s) as writer:
            for i in range(s * per_shard, min(count, (s + 1) * per_shard)):
                tensors = {"latent_mean": torch.randn(2, 4, h, h, generator=g).half(),
                           "latent_std": torch.rand(2, 4, h, h, generator=g).half(),
                           "clip_pixels": torch.randint(0, 256, (3, 224, 224), generator=g, dtype=torch.uint8)}
                if text_dim:
                    tensors["caption_states"] = torch.randn(77, text_dim, generator=g).half()
                    tensors["query_states"] = torch.randn(77, text_dim, generator=g).half()
                writer.add(CAPTIONS[i % len(CAPTIONS)], "the subject", f"bench/{i}", tensors)
    write_manifest(folder, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "resolution": resolution,
                            "clip_resolution": 224, "vae": "bench", "text_encoder": "bench" if text_dim else None,
                            "latent_dtype": "float16", "complete": True, "samples": count, "shards": shards})
    return os.path.join(folder, f"{{00000..{shards - 1:05d}}}.tar")


def data_module(source: dict, batch: int, workers: int, resolution: int) -> SubjectDataModule:
    dm = SubjectDataModule(batch_size=batch, num_workers=workers, resolution=resolution, shuffle_buffer=64,
                           prompt_dropout=0.8, subject_dropout=0.05, **source)
    dm.setup("fit")
    return dm


def time_loader(loader, batches: int):
    """-> (samples/s over ``batches`` batches after one warm-up batch, the batches' size)."""
    iterator = iter(loader)
    first = next(iterator)
    size = len(first["prompt"])
    start = time.perf_counter()
    seen = 0
    for _, batch in zip(range(batches), iterator):
        seen += len(batch["prompt"])
    elapsed = time.perf_counter() - start
    del iterator
    return seen / elapsed, size


def loader_table(args, raw_source: dict, shard_source: dict) -> None:
    print(f"\nloader throughput on CPU: {cpu_description()}")
    print(f"batch {args.batch}, raw images {args.image_size} JPEG -> {args.resolution}px SD view + 224px CLIP view; "
          f"shards: latents of both flips + CLIP view{' + text states' if args.text_dim else ''}")
    print(f"| {'source':<22} | workers | samples/s | per worker |")
    print(f"|{'-' * 24}|---------|-----------|------------|")
    for label, source in (("raw images (JSONL)", raw_source), ("precomputed shards", shard_source)):
        for workers in args.cpu_workers:
            dm = data_module(source, args.batch, workers, args.resolution)
            rate, _ = time_loader(dm.train_dataloader(), args.batches)
            print(f"| {label:<22} | {workers:7d} | {rate:9.1f} | {rate / max(1, workers):10.1f} |", flush=True)


def endless(loader):
    """Batches from ``loader``, epoch after epoch (a new epoch restarts its workers, as in training)."""
    while True:
        yield from loader


def train_step_table(args, raw_source: dict, shard_source: dict) -> None:
    import contextlib

    from bench_trainer import build_sd15, build_tiny, make_train_step, random_batch

    from trainer.core import SSRTrainingCore, new_ssr_weights

    device = torch.device("cpu" if args.tiny else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.tiny:  # smoke mode: the same code path on CPU with tiny models, fp32
        with tempfile.TemporaryDirectory() as tmp:
            sd, clip = build_tiny(tmp)
        weights = new_ssr_weights(sd.unet, sd.text_encoder.config.hidden_size, clip.config.width, 32, 4)
    else:
        sd, clip = build_sd15()
        weights = new_ssr_weights(sd.unet, sd.text_encoder.config.hidden_size, clip.config.width)
    core = SSRTrainingCore(sd, clip, weights).to(device)
    if not args.tiny:
        core.set_frozen_dtype(getattr(torch, args.frozen_dtype))
    core.train()
    autocast = contextlib.nullcontext if args.tiny else (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    optimizer = torch.optim.AdamW(core.ssr.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=0.01)
    generator = torch.Generator(device=device).manual_seed(0)

    step = make_train_step(core, optimizer, autocast, generator)

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    rows = []
    fixed = random_batch(args.batch, args.resolution, clip.config.image_size, device)
    fixed["subject_dropped"] = torch.zeros(args.batch, dtype=torch.bool, device=device)
    h = args.resolution // 8
    latent_batch = {k: v for k, v in fixed.items() if k != "pixel_values"}
    latent_batch["latent_mean"] = torch.randn(args.batch, 4, h, h, device=device).half()
    latent_batch["latent_std"] = torch.rand(args.batch, 4, h, h, device=device).half()
    for label, batch in (("step alone, VAE encode", fixed), ("step alone, precomputed latents", latent_batch)):
        for _ in range(args.warmup):
            step(batch)
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(batch)
        sync()
        rows.append((label, "-", args.batch * args.steps / (time.perf_counter() - start)))
    for label, source in (("raw images + VAE, fed by loader", raw_source), ("precomputed shards, fed by loader", shard_source)):
        dm = data_module(source, args.batch, args.workers, args.resolution)
        iterator = endless(dm.train_dataloader())
        for _ in range(args.warmup):
            step(to_device(next(iterator)))
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(to_device(next(iterator)))
        sync()
        rows.append((label, str(args.workers), args.batch * args.steps / (time.perf_counter() - start)))
        del iterator
    where = "tiny models, CPU fp32 (smoke mode)" if args.tiny else \
        f"SD1.5 size, {torch.cuda.get_device_name(device)}, bf16 autocast, frozen {args.frozen_dtype}"
    print(f"\ntraining step, {where}, batch {args.batch}, {args.steps} timed steps after {args.warmup}")
    print(f"| {'variant':<36} | workers | samples/s |")
    print(f"|{'-' * 38}|---------|-----------|")
    for label, workers, rate in rows:
        print(f"| {label:<36} | {workers:>7} | {rate:9.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=96, help="samples in each data set")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per loader measurement")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--image_size", default="1024x768", help="raw JPEG size WIDTHxHEIGHT")
    parser.add_argument("--text_dim", type=int, default=0, help="store text states of this width in the shards (768)")
    parser.add_argument("--cpu_workers", type=int, nargs="*", default=[0, 1, 2], help="worker counts for the CPU table")
    parser.add_argument("--train-step", dest="train_step", action="store_true", help="also the training step on CUDA")
    parser.add_argument("--workers", type=int, default=8, help="loader workers feeding the training step")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--frozen_dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the frozen models in the training step (bfloat16: frozen_dtype auto under "
                             "bf16-mixed)")
    parser.add_argument("--tiny", action="store_true", help="--train-step with tiny models on CPU (smoke mode)")
    args = parser.parse_args(argv)
    width, height = (int(x) for x in args.image_size.lower().split("x"))
    if args.train_step and not args.tiny and not torch.cuda.is_available():
        print("--train-step needs a CUDA device", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = write_raw_images(os.path.join(tmp, "raw"), args.samples, width, height)
        pattern = write_precomputed(os.path.join(tmp, "shards"), args.samples, max(1, args.samples // 8),
                                    args.resolution, args.text_dim)
        raw_source = {"train_jsonl": jsonl}
        shard_source = {"train_precomputed": pattern, "train_samples_per_epoch": 10 ** 9}
        if args.cpu_workers:
            loader_table(args, raw_source, {"train_precomputed": pattern})
        if args.train_step:
            train_step_table(args, raw_source, shard_source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
