"""Write the models the real-host tests load, every parameter random (ldm zero-initialises
some layers; with those zeros attention would have no effect and comparisons pass vacuously).

Run by build_host.py inside the WebUI's venv, with the repository and the WebUI's
``repositories/stable-diffusion-stability-ai`` on PYTHONPATH:

    python tests/realhost/make_models.py OUT [FINAL]

(FINAL: where OUT will be moved to; the checkpoint configs name the text encoder folder there.)

OUT/ (each top-level folder is linked into a test session's ``models/``):

    _text_encoder/                     SD1 text encoder config + CLIP BPE tokenizer files (1 layer, 768 wide)
    Stable-diffusion/tiny_sd1.safetensors + .yaml     SD1 architecture, model_channels 32
    Stable-diffusion/full_sd1.safetensors + .yaml     SD1 architecture at full UNet width (320), fp16
    clip_vision/tiny-clip-vit/         Hugging Face CLIPVisionModel folder (24 layers, 128 wide)
    ssr_encoder/tiny_ssr.safetensors   our single file, widths of tiny_sd1
    ssr_encoder/official_tiny/         the official pair (pytorch_model.bin + pytorch_model_1.bin)
    ssr_encoder/reexport_tiny/         the safetensors pair (ssr_aligner + ssr_attentions)
    ssr_encoder/full_ssr.safetensors   our single file, widths of full_sd1
    ControlNet/control_sd15_random.safetensors   ControlNet v1 layout for full_sd1
    ControlNet/ip-adapter_sd15_random.safetensors   IP-Adapter (ip-adapter_sd15 layout), widths of full_sd1
    ControlNet/ip-adapter_sd15_tiny.safetensors     the same layout, widths of tiny_sd1
    _annotator/clip_vision/clip_h.pth  CLIP ViT-H/14 vision tower + projection at full size (fp16 state
                                       dict, ~1.3 GB), as ControlNet's ip-adapter_clip_sd15 preprocessor
                                       loads it (torch.load of a plain state dict) from its annotator
                                       models folder (a session links it there, see build_host.make_data_dir)
"""
from __future__ import annotations

import gzip
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests import tiny_models as tm  # noqa: E402

import ssr  # noqa: E402
from ssr.weights import official_state_dicts, reexport_state_dicts  # noqa: E402

TEXT_WIDTH = 768  # SD1's context width: the SSR weights' family check and the aligner need it
TINY_CHANNELS = 32
FULL_CHANNELS = 320
VAE_CHANNELS = 32


def sd1_widths(model_channels: int):
    """attn2 inner widths in ssr.layers' canonical order for an SD1 UNet of this width."""
    return tuple(model_channels * m for m in (1, 1, 2, 2, 4, 4, 4, 4, 4, 2, 2, 2, 1, 1, 1, 4))


# --------------------------------------------------------------------------- text encoder

def _bytes_to_unicode():
    """CLIP's reversible byte -> printable character table (as used by its BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str) -> None:
    """vocab.json + merges.txt rebuilt from open_clip's packaged BPE merges: same ids as
    openai/clip-vit-large-patch14's tokenizer (49408 tokens)."""
    import open_clip

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_chars = _bytes_to_unicode()
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, model_max_length=77, do_lower_case=True, errors="replace",
                       tokenizer_class="CLIPTokenizer"), f)


def text_encoder(folder: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    os.makedirs(folder, exist_ok=True)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=TEXT_WIDTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    config.save_pretrained(folder)
    write_tokenizer(folder)
    model = CLIPTextModel(config)
    tm.randomize_(model, seed=11)
    # Real CLIP's token embeddings are ~0.01-0.03 in scale; keep the embedding table small
    # so that 77 tokens do not saturate the 2 tiny layers.
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight.mul_(0.5)
    return model


# --------------------------------------------------------------------------- SD1 checkpoints

def sd1_config(model_channels: int, text_folder: str) -> dict:
    return {"model": {
        "base_learning_rate": 1.0e-04,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64,
            "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
                "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
                "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
                "context_dim": TEXT_WIDTH, "use_checkpoint": False, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                             "ch": VAE_CHANNELS, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                             "attn_resolutions": [], "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": text_folder}},
        }}}


def vae_state_dict(seed: int):
    from ldm.models.autoencoder import AutoencoderKL

    ddconfig = sd1_config(32, "")["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    vae = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    tm.randomize_(vae, seed)
    return {k: v for k, v in vae.state_dict().items() if not k.startswith("loss.")}


def write_checkpoint(path: str, model_channels: int, text_folder: str, text_model, seed: int, dtype) -> dict:
    from omegaconf import OmegaConf

    unet = tm.ldm_unet_sd1(model_channels=model_channels, context_dim=TEXT_WIDTH, seed=seed)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_state_dict(seed + 1).items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in text_model.state_dict().items()
               if not k.endswith("position_ids")})
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, path)
    OmegaConf.save(OmegaConf.create(sd1_config(model_channels, text_folder)), os.path.splitext(path)[0] + ".yaml")
    return unet.state_dict()


def controlnet_state_dict(unet_sd: dict, model_channels: int, seed: int) -> dict:
    """ControlNet v1 (``control_model.*``): the UNet's encoder half, a 1x1 conv per input
    block output, the hint encoder (3 -> 16 -> 32 -> 96 -> 256 -> model_channels, 8 convs)
    and a 1x1 conv after the middle block."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return torch.randn(*shape, generator=g) / fan_in ** 0.5

    sd = {k: v.clone() for k, v in unet_sd.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    chans = [model_channels * m for m in (1, 1, 1, 1, 2, 2, 2, 4, 4, 4, 4, 4)]
    for i, c in enumerate(chans):
        sd[f"zero_convs.{i}.0.weight"], sd[f"zero_convs.{i}.0.bias"] = rand(c, c, 1, 1) * 0.5, 0.05 * torch.randn(c, generator=g)
    hint = [(3, 16), (16, 16), (16, 32), (32, 32), (32, 96), (96, 96), (96, 256), (256, model_channels)]
    for j, (cin, cout) in enumerate(hint):
        sd[f"input_hint_block.{2 * j}.weight"], sd[f"input_hint_block.{2 * j}.bias"] = rand(cout, cin, 3, 3), 0.05 * torch.randn(cout, generator=g)
    top = model_channels * 4
    sd["middle_block_out.0.weight"], sd["middle_block_out.0.bias"] = rand(top, top, 1, 1) * 0.5, 0.05 * torch.randn(top, generator=g)
    return {"control_model." + k: v for k, v in sd.items()}


# --------------------------------------------------------------------------- IP-Adapter

CLIP_H_EMBED = 1024  # CLIP ViT-H/14's image embedding (projection) width


def ip_adapter_state_dict(widths, seed: int, tokens: int = 4) -> dict:
    """ip-adapter_sd15 as a single safetensors file: ``image_proj.*`` (Linear from the CLIP
    image embedding to ``tokens`` context tokens, then LayerNorm) and ``ip_adapter.{i}.to_k_ip`` /
    ``to_v_ip`` (Linear(768 -> layer width), no bias) for the attn2 layers i = 1, 3, ..., 31:
    input blocks, then output blocks, then the middle block (``widths`` in that order, which
    is ssr.layers' canonical order too)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "image_proj.proj.weight": torch.randn(tokens * TEXT_WIDTH, CLIP_H_EMBED, generator=g) / CLIP_H_EMBED ** 0.5,
        "image_proj.proj.bias": 0.1 * torch.randn(tokens * TEXT_WIDTH, generator=g),
        "image_proj.norm.weight": 1.0 + 0.2 * torch.randn(TEXT_WIDTH, generator=g),
        "image_proj.norm.bias": 0.1 * torch.randn(TEXT_WIDTH, generator=g),
    }
    for n, width in enumerate(widths):
        for kind in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{2 * n + 1}.{kind}.weight"] = torch.randn(width, TEXT_WIDTH, generator=g) / TEXT_WIDTH ** 0.5
    return sd


def write_clip_h(path: str, seed: int) -> None:
    """CLIP ViT-H/14 image tower with projection (transformers CLIPVisionModelWithProjection;
    the published OpenCLIP ViT-H-14 shape: 32 layers, 1280 wide, 16 heads, MLP 5120, GELU,
    patch 14 at 224 px, 1024-wide projection), every parameter random, saved as a plain
    state dict in fp16."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=CLIP_H_EMBED, hidden_act="gelu",
                              layer_norm_eps=1e-5)
    model = CLIPVisionModelWithProjection(config)
    tm.randomize_(model, seed)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    del model
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(sd, path)


# --------------------------------------------------------------------------- main

def main(out: str, final: str) -> None:
    os.makedirs(out, exist_ok=True)
    text_model = text_encoder(os.path.join(out, "_text_encoder"))
    text_folder = os.path.join(final, "_text_encoder")  # as the checkpoint configs will find it

    ckpts = os.path.join(out, "Stable-diffusion")
    os.makedirs(ckpts, exist_ok=True)
    write_checkpoint(os.path.join(ckpts, "tiny_sd1.safetensors"), TINY_CHANNELS, text_folder, text_model, 21, torch.float32)
    full_unet = write_checkpoint(os.path.join(ckpts, "full_sd1.safetensors"), FULL_CHANNELS, text_folder, text_model,
                                 31, torch.float16)

    clip_dir = os.path.join(out, "clip_vision", "tiny-clip-vit")
    tm.tiny_hf_clip_vision(seed=5).save_pretrained(clip_dir, safe_serialization=True)

    ssr_dir = os.path.join(out, "ssr_encoder")
    for sub in ("official_tiny", "reexport_tiny"):
        os.makedirs(os.path.join(ssr_dir, sub), exist_ok=True)
    tiny = dict(context_dim=TEXT_WIDTH, image_dim=tm.TINY_CLIP_WIDTH, widths=sd1_widths(TINY_CHANNELS))
    ssr.save_ssr_weights(tm.tiny_ssr_weights(seed=3, **tiny), os.path.join(ssr_dir, "tiny_ssr.safetensors"))
    aligner, layers = official_state_dicts(tm.tiny_ssr_weights(seed=4, **tiny))
    torch.save(aligner, os.path.join(ssr_dir, "official_tiny", "pytorch_model.bin"))
    torch.save(layers, os.path.join(ssr_dir, "official_tiny", "pytorch_model_1.bin"))
    aligner, layers = reexport_state_dicts(tm.tiny_ssr_weights(seed=6, **tiny))
    save_file(aligner, os.path.join(ssr_dir, "reexport_tiny", "ssr_aligner.safetensors"))
    save_file(layers, os.path.join(ssr_dir, "reexport_tiny", "ssr_attentions.safetensors"))
    full = dict(context_dim=TEXT_WIDTH, image_dim=tm.TINY_CLIP_WIDTH, widths=sd1_widths(FULL_CHANNELS))
    ssr.save_ssr_weights(tm.tiny_ssr_weights(seed=7, **full), os.path.join(ssr_dir, "full_ssr.safetensors"))

    cn_dir = os.path.join(out, "ControlNet")
    os.makedirs(cn_dir, exist_ok=True)
    cn = controlnet_state_dict(full_unet, FULL_CHANNELS, seed=41)
    save_file({k: v.half().contiguous() for k, v in cn.items()}, os.path.join(cn_dir, "control_sd15_random.safetensors"))
    del cn, full_unet
    for name, channels, seed in (("ip-adapter_sd15_random", FULL_CHANNELS, 43), ("ip-adapter_sd15_tiny", TINY_CHANNELS, 45)):
        ip = ip_adapter_state_dict(sd1_widths(channels), seed)
        save_file({k: v.half().contiguous() for k, v in ip.items()}, os.path.join(cn_dir, name + ".safetensors"))
    write_clip_h(os.path.join(out, "_annotator", "clip_vision", "clip_h.pth"), seed=47)
    print(f"models written to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else sys.argv[1])
