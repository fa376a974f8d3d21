"""The frozen Stable Diffusion 1.x parts the trainer needs, from the files users have.

Two sources:
- a single-file checkpoint in the original ``ldm`` key layout (what the WebUI loads:
  ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``),
  ``.safetensors`` or ``.ckpt``/``.pt`` (read with ``weights_only`` loading: no pickled code
  runs). Its keys are converted with diffusers' single-file conversion functions into
  models built from configs read *locally*: the SD1.5 configs shipped in ``trainer/sd15/``
  by default, or any folder with the same layout (``unet/config.json``, ``vae/config.json``,
  ``text_encoder/config.json``, ``scheduler/scheduler_config.json``; a diffusers model folder
  qualifies);
- a diffusers model folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``, optional
  ``tokenizer/``), loaded with ``from_pretrained(..., local_files_only=True)``.

Nothing is ever fetched from a hub. The tokenizer is the folder's ``tokenizer/`` if present,
else CLIP's BPE vocabulary as open_clip ships it (``ssr.query_encoder.BpeQueryTokenizer``,
the same ids). Prompts and queries are both tokenised as SD1.x does: BOS, words, EOS, EOS
padding to 77 tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import torch
from torch import nn

from ssr.files import WeightFileError, read_state_dict
from ssr.query_encoder import BpeQueryTokenizer, hf_query_tokens

SD15_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15")
_CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
Tokenize = Callable[[Sequence[str]], torch.Tensor]  # texts -> [B, 77] token ids


@dataclass
class StableDiffusionParts:
    """Frozen SD parts (fp32, CPU, eval, requires_grad False) and the noise schedule.

    unet: diffusers UNet2DConditionModel; vae: AutoencoderKL; text_encoder: transformers
    CLIPTextModel; tokenize: texts -> [B, 77] LongTensor; noise_scheduler: DDPMScheduler
    (training noise schedule; samplers are built from its config); source: what was loaded.
    """

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenize: Tokenize
    noise_scheduler: object
    source: str


def read_configs(config_dir: str) -> Dict[str, dict]:
    """-> {"unet", "vae", "text_encoder", "scheduler": config dict}, read from ``config_dir``."""
    configs = {}
    for part, rel in _CONFIG_FILES.items():
        path = os.path.join(config_dir, rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{config_dir}: model config folder lacks {rel} (expected the layout of "
                                    f"{SD15_CONFIG_DIR}: unet/, vae/, text_encoder/, scheduler/)")
        with open(path, encoding="utf-8") as f:
            try:
                configs[part] = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
    return configs


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _load_exact(module: nn.Module, state: Dict[str, torch.Tensor], path: str, what: str, config_dir: str) -> None:
    """load_state_dict with every key and shape checked, failing with a message a user can act on."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (config wants {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise WeightFileError(
            f"{path}: the {what} weights do not fit the architecture in {config_dir}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} wrong shapes (e.g. {wrong[:2]}). Is this an SD1.x checkpoint? For another SD1-style "
            "architecture, pass a matching config folder as sd_config_dir")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _check_sd1(keys: Sequence[str], path: str) -> None:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise WeightFileError(f"{path}: this is an SDXL checkpoint; SSR-Encoder training needs an SD1.x checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise WeightFileError(f"{path}: this is an SD2.x checkpoint (OpenCLIP text encoder); "
                              "SSR-Encoder training needs an SD1.x checkpoint")
    for prefix, what in (("model.diffusion_model.", "UNet"), ("first_stage_model.", "VAE"),
                         ("cond_stage_model.transformer.", "text encoder")):
        if not any(k.startswith(prefix) for k in keys):
            raise WeightFileError(f"{path}: no {what} weights ({prefix}*); expected a full Stable Diffusion 1.x "
                                  f"checkpoint in the original (WebUI) layout, first keys: {sorted(keys)[:4]}")


def _text_encoder_state(checkpoint: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """ldm text encoder keys -> ``model``'s keys. SD1 checkpoints hold transformers' 4.x
    layout (``text_model.embeddings...``; very old ones lack ``text_model.``); transformers 5
    dropped that level, so it is added or removed to match the installed version."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    nested = any(k.startswith("text_model.") for k in model.state_dict())
    state = {}
    for key, value in convert_ldm_clip_checkpoint(checkpoint).items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        if bare == "embeddings.position_ids":
            continue  # a constant buffer that current transformers does not store
        state[("text_model." + bare) if nested else bare] = value
    return state


def load_single_file(path: str, config_dir: str = SD15_CONFIG_DIR) -> StableDiffusionParts:
    """SD1.x single-file checkpoint (ldm layout, .safetensors/.ckpt) -> StableDiffusionParts."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    checkpoint, _ = read_state_dict(path)
    _check_sd1(list(checkpoint), path)
    configs = read_configs(config_dir)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    _load_exact(unet, convert_ldm_unet_checkpoint(checkpoint, unet.config), path, "UNet", config_dir)
    vae = AutoencoderKL.from_config(configs["vae"])
    _load_exact(vae, convert_ldm_vae_checkpoint(checkpoint, vae.config), path, "VAE", config_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    _load_exact(text_encoder, _text_encoder_state(checkpoint, text_encoder), path, "text encoder", config_dir)
    del checkpoint
    return StableDiffusionParts(_freeze(unet), _freeze(vae), _freeze(text_encoder), BpeQueryTokenizer(),
                                DDPMScheduler.from_config(configs["scheduler"]), os.path.basename(path))


def _from_pretrained(cls, folder: str, subfolder: str):
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    except (OSError, EnvironmentError) as first:
        try:  # folders saved with only half-precision weights
            return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, variant="fp16")
        except (OSError, EnvironmentError):
            raise WeightFileError(f"{os.path.join(folder, subfolder)}: cannot load {cls.__name__} ({first})") from first


def load_diffusers_folder(folder: str) -> StableDiffusionParts:
    """Diffusers SD1.x model folder -> StableDiffusionParts (local files only)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise WeightFileError(f"{folder}: not a diffusers model folder (no {sub}/ subfolder)")
    unet = _from_pretrained(UNet2DConditionModel, folder, "unet")
    vae = _from_pretrained(AutoencoderKL, folder, "vae")
    text_encoder = _from_pretrained(CLIPTextModel, folder, "text_encoder")
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True))
    tokenizer_dir = os.path.join(folder, "tokenizer")
    if os.path.isdir(tokenizer_dir):
        hf_tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

        def tokenize(texts: Sequence[str]) -> torch.Tensor:
            return hf_query_tokens(hf_tokenizer, texts)
    else:
        tokenize = BpeQueryTokenizer()
    return StableDiffusionParts(_freeze(unet.float()), _freeze(vae.float()), _freeze(text_encoder.float()), tokenize,
                                scheduler, os.path.basename(os.path.normpath(folder)))


def load_stable_diffusion(path: str, config_dir: str | None = None) -> StableDiffusionParts:
    """A diffusers folder or an SD1.x single-file checkpoint -> StableDiffusionParts.

    ``config_dir`` (single files only): architecture configs, default the shipped SD1.5 ones.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: Stable Diffusion model not found (expected an SD1.x .safetensors/.ckpt "
                                "file or a diffusers model folder)")
    if os.path.isdir(path):
        return load_diffusers_folder(path)
    return load_single_file(path, config_dir or SD15_CONFIG_DIR)
