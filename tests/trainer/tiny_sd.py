"""Tiny Stable Diffusion 1.x files for the trainer tests, in the real formats.

``write_ldm_checkpoint`` builds the *original* ldm modules (the ``ldm`` package's UNetModel,
Encoder/Decoder, and the transformers CLIPTextModel that ldm's FrozenCLIPEmbedder wraps),
saves them under the WebUI key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``) as .safetensors or .ckpt, and writes the matching
diffusers configs. The trainer converts them with diffusers' single-file functions, so
comparing the two forwards tests the whole conversion path independently.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests import tiny_models as tm  # noqa: E402

UNET_CHANNELS = 32
CONTEXT_DIM = 32
VAE_CHANNELS = 32
CLIP_WIDTH, CLIP_LAYERS, CLIP_HEADS = 64, 6, 1  # 64-dim heads; 6 layers = one per scale


class LdmVae(nn.Module):
    """ldm's AutoencoderKL parts under their checkpoint names (encoder, decoder, quant convs)."""

    def __init__(self, channels: int = VAE_CHANNELS):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        dd = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=channels,
                  ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=[], dropout=0.0)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.post_quant_conv = nn.Conv2d(4, 4, 1)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] -> [B, 8, H/8, W/8] (mean, logvar)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def sd_configs() -> Dict[str, dict]:
    """diffusers configs of the tiny models (the layout of trainer/sd15)."""
    with open(os.path.join(ROOT, "trainer", "sd15", "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    return {
        "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
                 "layers_per_block": 2, "block_out_channels": [UNET_CHANNELS * m for m in (1, 2, 4, 4)],
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "cross_attention_dim": CONTEXT_DIM, "attention_head_dim": 8, "norm_num_groups": 32},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "layers_per_block": 1, "norm_num_groups": 32, "block_out_channels": [VAE_CHANNELS] * 4,
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "sample_size": 64, "scaling_factor": 0.18215},
        "text_encoder": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": CONTEXT_DIM,
                         "intermediate_size": 2 * CONTEXT_DIM, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        "scheduler": scheduler,
    }


def write_configs(folder: str) -> str:
    paths = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    for part, config in sd_configs().items():
        path = os.path.join(folder, paths[part])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(config, f)
    return folder


@dataclass
class TinyLdmCheckpoint:
    path: str
    config_dir: str
    unet: nn.Module  # ldm UNetModel
    vae: LdmVae
    text_encoder: nn.Module  # transformers CLIPTextModel


def build_ldm_models(seed: int = 0):
    unet = tm.ldm_unet_sd1(model_channels=UNET_CHANNELS, context_dim=CONTEXT_DIM, seed=seed)
    vae = tm.randomize_(LdmVae(), seed + 1).eval()
    with torch.no_grad():
        vae.quant_conv.weight.mul_(0.3)  # keep latents O(1)
    text = tm.tiny_text_encoder(seed + 2, width=CONTEXT_DIM).model
    return unet, vae, text


def write_ldm_checkpoint(folder: str, fmt: str = "safetensors", seed: int = 0) -> TinyLdmCheckpoint:
    """Tiny SD1.x checkpoint in the WebUI layout (+ its config folder) under ``folder``."""
    unet, vae, text = build_ldm_models(seed)
    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", text)):
        state.update({prefix + k: v.detach().clone().contiguous() for k, v in module.state_dict().items()})
    # SD1 files hold transformers 4.x text encoder names (text_model.*), whatever is installed now.
    state = {k.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.")
             if k.startswith("cond_stage_model.transformer.") and ".text_model." not in k else k: v
             for k, v in state.items()}
    # Real checkpoints carry this buffer and ldm's schedule; the loader must cope with both.
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    os.makedirs(folder, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = os.path.join(folder, "tiny-sd1.safetensors")
        save_file(state, path)
    else:
        path = os.path.join(folder, "tiny-sd1.ckpt")
        torch.save({"state_dict": state, "global_step": 1}, path)
    return TinyLdmCheckpoint(path, write_configs(os.path.join(folder, "configs")), unet, vae, text)


def write_clip_vision(folder: str, seed: int = 5) -> str:
    """Hugging Face CLIPVisionModel folder (config.json + model.safetensors)."""
    model = tm.tiny_hf_clip_vision(seed, width=CLIP_WIDTH, layers=CLIP_LAYERS, heads=CLIP_HEADS)
    model.save_pretrained(folder)
    return folder


def tiny_sd_parts(seed: int = 0):
    """In-memory StableDiffusionParts with every parameter random (no files)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ssr.query_encoder import BpeQueryTokenizer
    from trainer.sd_loading import StableDiffusionParts

    configs = sd_configs()
    unet = tm.randomize_(UNet2DConditionModel.from_config(configs["unet"]), seed)
    vae = tm.randomize_(AutoencoderKL.from_config(configs["vae"]), seed + 1)
    with torch.no_grad():
        vae.quant_conv.weight.mul_(0.3)
    text = tm.randomize_(CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])), seed + 2)
    parts = [m.requires_grad_(False).eval() for m in (unet, vae, text)]
    return StableDiffusionParts(*parts, BpeQueryTokenizer(), DDPMScheduler.from_config(configs["scheduler"]), "tiny")


def tiny_core(seed: int = 0, regularizer: str = "reference", tau: float = 0.1, latent_cache=None):
    """SSRTrainingCore over tiny random SD parts, a tiny CLIP (open_clip tower) and tiny SSR weights."""
    from trainer.core import SSRTrainingCore

    clip = tm.tiny_clip_image_encoder(seed + 3, width=CLIP_WIDTH, layers=CLIP_LAYERS, heads=CLIP_HEADS)
    weights = tm.tiny_ssr_weights(seed + 4, context_dim=CONTEXT_DIM, image_dim=CLIP_WIDTH)
    return SSRTrainingCore(tiny_sd_parts(seed), clip, weights, regularizer, tau, latent_cache)


def tiny_batch(batch: int = 2, seed: int = 0, resolution: int = 64, clip_size: int = 224):
    g = torch.Generator().manual_seed(seed)
    prompts = ["a red square on a green background", "", "a dog on the beach", "a cat"][:batch]
    queries = ["the red square", "the dog", "", "the cat"][:batch]
    return {"pixel_values": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
            "clip_pixel_values": torch.randn(batch, 3, clip_size, clip_size, generator=g),
            "prompt": prompts, "query": queries, "key": [f"img{i}.png" for i in range(batch)],
            "subject_dropped": torch.tensor([q == "" for q in queries])}
