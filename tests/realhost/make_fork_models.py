"""Write the models Forge and reForge load, every parameter random.

Both forks find a checkpoint's architecture from its tensor shapes (no config file beside
it), so their SD1.5 checkpoint has every part at the published SD1.5 size: the UNet
(model_channels 320), the VAE (ch 128, 2 res blocks) and the CLIP ViT-L/14 text encoder
(12 layers, 768 wide). Run by build_host.py inside the WebUI's venv, with the repository
and the WebUI's ``repositories/stable-diffusion-stability-ai`` and the WebUI folder on
PYTHONPATH:

    python tests/realhost/make_fork_models.py OUT

OUT/ (each top-level folder is linked into a fork session's ``models/``):

    Stable-diffusion/sd15_random.safetensors   SD1.5 layout, fp16, random
    VAE-approx/model.pt                         the live-preview approximation (both forks
                                                download it at the first generation otherwise)
    ssr_encoder/full_ssr.safetensors            our single file, widths of the SD1.5 UNet
    clip_vision/tiny-clip-vit/                  Hugging Face CLIPVisionModel folder (tiny)
    ControlNet/control_sd15_random.safetensors         ControlNet v1 layout for the SD1.5 UNet (fp16),
                                                       for the forks' built-in ControlNet
    ControlNet/ip-adapter_sd15_random.safetensors      IP-Adapter (ip-adapter_sd15 layout) for the
                                                       built-in IP-Adapter, widths of the SD1.5 UNet
    ControlNetPreprocessor/CLIP-ViT-H-14.safetensors   CLIP ViT-H/14 vision tower + projection at full
                                                       size (fp16), where the built-in "CLIP-ViT-H
                                                       (IPAdapter)" preprocessor looks before downloading
"""
from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests import tiny_models as tm  # noqa: E402

import ssr  # noqa: E402

TEXT_WIDTH = 768
CHANNELS = 320


def sd1_widths(model_channels: int):
    m = model_channels
    return [m, m, 2 * m, 2 * m, 4 * m, 4 * m, 4 * m, 4 * m, 4 * m, 2 * m, 2 * m, 2 * m, m, m, m, 4 * m]


def text_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=TEXT_WIDTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = CLIPTextModel(config)
    tm.randomize_(model, seed=51)
    with torch.no_grad():  # keep 12 random layers from saturating (real CLIP's embeddings are small)
        model.text_model.embeddings.token_embedding.weight.mul_(0.5)
    return model


def vae():
    from ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    tm.randomize_(model, seed=53)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("loss.")}


def main(out: str) -> None:
    ckpts = os.path.join(out, "Stable-diffusion")
    os.makedirs(ckpts, exist_ok=True)
    unet = tm.ldm_unet_sd1(model_channels=CHANNELS, context_dim=TEXT_WIDTH, seed=55)
    unet_sd = unet.state_dict()
    sd = {"model.diffusion_model." + k: v for k, v in unet_sd.items()}
    del unet
    sd.update({"first_stage_model." + k: v for k, v in vae().items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in text_model().state_dict().items()
               if not k.endswith("position_ids")})
    save_file({k: v.half().contiguous() for k, v in sd.items()}, os.path.join(ckpts, "sd15_random.safetensors"))
    del sd

    from modules.sd_vae_approx import VAEApprox  # the WebUI v1.10.1 class: the format both forks read

    approx = tm.randomize_(VAEApprox(), seed=57)
    os.makedirs(os.path.join(out, "VAE-approx"), exist_ok=True)
    torch.save(approx.state_dict(), os.path.join(out, "VAE-approx", "model.pt"))

    ssr_dir = os.path.join(out, "ssr_encoder")
    os.makedirs(ssr_dir, exist_ok=True)
    full = dict(context_dim=TEXT_WIDTH, image_dim=tm.TINY_CLIP_WIDTH, widths=sd1_widths(CHANNELS))
    ssr.save_ssr_weights(tm.tiny_ssr_weights(seed=59, **full), os.path.join(ssr_dir, "full_ssr.safetensors"))
    tm.tiny_hf_clip_vision(seed=61).save_pretrained(os.path.join(out, "clip_vision", "tiny-clip-vit"),
                                                    safe_serialization=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_models

    cn_dir = os.path.join(out, "ControlNet")
    os.makedirs(cn_dir, exist_ok=True)
    control = make_models.controlnet_state_dict(unet_sd, CHANNELS, seed=67)
    del unet_sd
    save_file({k: v.half().contiguous() for k, v in control.items()}, os.path.join(cn_dir, "control_sd15_random.safetensors"))
    del control
    ip = make_models.ip_adapter_state_dict(sd1_widths(CHANNELS), seed=63)
    save_file({k: v.half().contiguous() for k, v in ip.items()}, os.path.join(cn_dir, "ip-adapter_sd15_random.safetensors"))
    pre = os.path.join(out, "ControlNetPreprocessor")
    make_models.write_clip_h(os.path.join(pre, "clip_h.pth"), seed=65)
    save_file(torch.load(os.path.join(pre, "clip_h.pth")), os.path.join(pre, "CLIP-ViT-H-14.safetensors"))
    os.remove(os.path.join(pre, "clip_h.pth"))
    print(f"fork models written to {out}")


if __name__ == "__main__":
    target = sys.argv[1]
    del sys.argv[1:]  # the WebUI's modules parse the command line when imported
    main(target)
