"""Tiny random models and a tiny dataset for a CPU smoke run of the trainer (no downloads).

    python -m trainer.smoke_assets runs/smoke_assets
    python -m trainer fit --config trainer/configs/tiny_cpu.yaml

Writes, under the given folder:
  sd-tiny/           a diffusers SD1-layout model folder (UNet 32 channels, 32-dim text
                     context, 4-level VAE, 2-layer CLIP text encoder with CLIP's vocabulary)
  clip-vision-tiny/  a Hugging Face CLIPVisionModel folder (width 64, 6 layers, 224 px)
  data/train.jsonl, data/val.jsonl, data/images/   the JSONL format
  data/shards/00000.tar                            the same samples as a WebDataset shard
Weights are random (every parameter, including the layers diffusers zero-initialises, so
gradients reach the SSR weights); the smoke run only shows that everything runs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
from typing import List, Tuple

import torch
from torch import nn

from .sd_loading import SD15_CONFIG_DIR

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle")


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random: matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.04), other
    vectors N(0, 0.01) (keeps activations O(1); no zero-initialised layer stays inert)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def write_tiny_sd(folder: str, seed: int = 0) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    randomize_(unet, seed).save_pretrained(os.path.join(folder, "unet"))
    randomize_(vae, seed + 1)
    with torch.no_grad():  # a VAE whose latents stay O(1), like the real one's
        vae.encoder.conv_out.weight.mul_(0.3)
    vae.save_pretrained(os.path.join(folder, "vae"))
    randomize_(text, seed + 2).save_pretrained(os.path.join(folder, "text_encoder"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    shutil.copy(os.path.join(SD15_CONFIG_DIR, "scheduler", "scheduler_config.json"), os.path.join(folder, "scheduler"))


def write_tiny_clip_vision(folder: str, seed: int = 0) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=1, image_size=224,
        patch_size=14, hidden_act="quick_gelu", projection_dim=32))
    randomize_(model, seed).save_pretrained(folder)


def shape_image(color: str, shape: str, background: str, size: Tuple[int, int] = (96, 80)) -> "Image.Image":
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, COLORS[background])
    draw = ImageDraw.Draw(image)
    box = (size[0] // 5, size[1] // 5, size[0] // 5 + size[1] // 2, size[1] // 5 + size[1] // 2)  # off-centre
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLORS[color])
    return image


def write_tiny_data(folder: str) -> None:
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    os.makedirs(os.path.join(folder, "shards"), exist_ok=True)
    rows: List[dict] = []
    names = list(COLORS)
    for i, (color, shape) in enumerate((c, s) for c in names for s in SHAPES):
        background = names[(names.index(color) + 1 + i) % len(names)]
        if background == color:
            background = names[(names.index(color) + 2) % len(names)]
        name = f"{i:03d}_{color}_{shape}.png"
        shape_image(color, shape, background).save(os.path.join(images, name))
        rows.append({"file_name": f"images/{name}", "text": f"a {color} {shape} on a {background} background",
                     "query": f"the {color} {shape}"})
    with open(os.path.join(folder, "train.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, "val.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:2])
    with tarfile.open(os.path.join(folder, "shards", "00000.tar"), "w") as tar:
        for i, row in enumerate(rows):
            with open(os.path.join(folder, row["file_name"]), "rb") as image:
                members = {"png": image.read(), "txt": row["text"].encode(),
                           "json": json.dumps({"caption": row["text"], "query": row["query"]}).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_all(folder: str, seed: int = 0) -> None:
    write_tiny_sd(os.path.join(folder, "sd-tiny"), seed)
    write_tiny_clip_vision(os.path.join(folder, "clip-vision-tiny"), seed + 10)
    write_tiny_data(os.path.join(folder, "data"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.smoke_assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="runs/smoke_assets", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_all(args.folder, args.seed)
    print(f"wrote tiny models and data to {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
