"""Benchmark of the trainer's full training step (random weights; timing depends only on shapes).

    python bench/bench_trainer.py                 # SD1.5 size, batch 16, bf16, on CUDA
    python bench/bench_trainer.py --tiny          # CPU smoke mode (tiny models), under a minute

One step = text encoder (prompts + queries) + VAE encode (or cached latents) + CLIP ViT-L/14
multi-scale features + SSR encoder + UNet forward/backward with the subject branch (the
ssr hooks) + AdamW step, exactly ``trainer.core.SSRTrainingCore.losses`` as training runs
it (frozen models in bf16, trainable weights fp32 under bf16 autocast). Data loading is not
included (the batch is already on the device). Variants: gradient checkpointing off/on x
VAE encode / cached latents, plus the UNet forward+backward alone for reference.
Prints samples/s, ms per step and peak memory.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.core import LatentCache, SSRTrainingCore, new_ssr_weights  # noqa: E402

WORDS = "a photo of the red dog cat car small big on beach in snow wearing hat with a city at night".split()


def build_sd15():
    """SD1.5-size parts with random weights, from the shipped configs."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ssr import ClipImageEncoder
    from ssr.query_encoder import BpeQueryTokenizer
    from trainer.sd_loading import SD15_CONFIG_DIR, StableDiffusionParts, read_configs

    configs = read_configs(SD15_CONFIG_DIR)
    parts = StableDiffusionParts(UNet2DConditionModel.from_config(configs["unet"]),
                                 AutoencoderKL.from_config(configs["vae"]),
                                 CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
                                 BpeQueryTokenizer(), DDPMScheduler.from_config(configs["scheduler"]), "random SD1.5")
    return parts, ClipImageEncoder()


def build_tiny(folder: str):
    from ssr import load_clip_image_encoder
    from trainer.sd_loading import load_stable_diffusion
    from trainer.smoke_assets import write_all

    write_all(folder)
    return (load_stable_diffusion(os.path.join(folder, "sd-tiny")),
            load_clip_image_encoder(os.path.join(folder, "clip-vision-tiny"), expect_width=None))


def random_batch(batch: int, resolution: int, clip_size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 20, (2 * batch,), generator=g)]
    return {"pixel_values": (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(device),
            "clip_pixel_values": torch.randn(batch, 3, clip_size, clip_size, generator=g).to(device),
            "prompt": texts[:batch], "query": texts[batch:], "key": [f"sample{i}" for i in range(batch)]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(core: SSRTrainingCore, optimizer: torch.optim.Optimizer, autocast, generator: torch.Generator):
    """-> step(batch): one timed training step of the benches (bench_trainer, bench_data): the
    loss under ``autocast()``, backward, gradient clipping at 1.0, the optimizer step, and the
    subject context cleared."""
    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = core.losses(batch, generator)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(core.ssr.parameters(), 1.0)
        optimizer.step()
        core.set_subject_context(None)
    return step


def time_steps(step, device: torch.device, warmup: int, steps: int):
    """-> (seconds per step, peak memory in GiB or nan)."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return elapsed, peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke mode)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 16; tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny: 1)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 512; tiny: 64)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    batch = args.batch or (2 if tiny else 16)
    steps = args.steps or (2 if tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    resolution = args.resolution or (64 if tiny else 512)
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if not tiny and device.type != "cuda":
        print("no CUDA device: use --tiny for the CPU smoke mode", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    autocast = contextlib.nullcontext if tiny else (lambda: torch.autocast("cuda", dtype=torch.bfloat16))

    with tempfile.TemporaryDirectory() as tmp:
        sd, clip = build_tiny(tmp) if tiny else build_sd15()
    inner, heads = (32, 4) if tiny else (512, 8)
    weights = new_ssr_weights(sd.unet, sd.text_encoder.config.hidden_size, clip.config.width, inner, heads)
    core = SSRTrainingCore(sd, clip, weights).to(device)
    if not tiny:
        core.set_frozen_dtype(torch.bfloat16)  # what frozen_dtype "auto" does under bf16-mixed
    core.train()
    optimizer = torch.optim.AdamW(core.ssr.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=0.01)
    data = random_batch(batch, resolution, clip.config.image_size, device)
    generator = torch.Generator(device=device).manual_seed(0)

    train = make_train_step(core, optimizer, autocast, generator)

    def train_step():
        train(data)

    # The reference point: UNet forward + backward alone, trainable subject branch.
    with torch.no_grad(), autocast():
        text = core.encode_texts(data["prompt"])
        latents = core.encode_latents(data["pixel_values"], generator)
    tokens = torch.randn(batch, 462, text.shape[-1], device=device, requires_grad=True)  # stands in for c_s
    timesteps = torch.randint(0, 1000, (batch,), device=device)

    def unet_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            core.set_subject_context(tokens)
            core._unet(latents, timesteps, text).float().pow(2).mean().backward()
        core.set_subject_context(None)

    rows = []
    for checkpointing in (False, True):
        (core.unet.enable_gradient_checkpointing if checkpointing else core.unet.disable_gradient_checkpointing)()
        for cached in (False, True):
            core.latent_cache = LatentCache("bench", memory_items=4 * batch) if cached else None
            seconds, peak = time_steps(train_step, device, warmup, steps)  # warm-up fills the cache
            rows.append((f"full step, {'cached latents' if cached else 'VAE encode'}", checkpointing, seconds, peak))
        core.latent_cache = None
        seconds, peak = time_steps(unet_step, device, warmup, steps)
        rows.append(("UNet fwd+bwd only", checkpointing, seconds, peak))

    name = "tiny models, CPU fp32" if tiny else f"SD1.5 size, {torch.cuda.get_device_name(device)}, bf16"
    print(f"\n{name}, batch {batch}, {resolution}px, {steps} timed steps after {warmup} warm-up")
    print(f"| {'variant':<28} | grad ckpt | samples/s | ms/step | peak GiB |")
    print(f"|{'-' * 30}|-----------|-----------|---------|----------|")
    for label, checkpointing, seconds, peak in rows:
        print(f"| {label:<28} | {'on' if checkpointing else 'off':<9} | {batch / seconds:9.1f} | "
              f"{seconds * 1e3:7.1f} | {peak:8.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
