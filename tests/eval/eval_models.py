"""Tiny random scoring models in the real file formats, for the evaluation tests.

Every builder makes the real architecture (so the real key layout) at a tiny width, with
every parameter randomised (``tests.tiny_models.randomize_``), and writes it the way the
real files are published:

- Hugging Face CLIPModel folder (config.json, model.safetensors, CLIP tokenizer files made
  from the BPE vocabulary open_clip ships, preprocessor_config.json): what
  openai/clip-vit-base-patch32 looks like, and what torchmetrics' CLIPScore loads;
- open_clip / OpenAI-layout CLIP state dicts (.safetensors and a weights-only .pt);
- Hugging Face DINO (ViTModel) and DINOv2 (Dinov2Model) folders;
- DINO's torch.hub backbone .pth (timm VisionTransformer, the module names DINO uses);
- the LAION aesthetic head .pth (MLP and linear).
"""
from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.tiny_models import randomize_  # noqa: E402

CLIP_EMBED = 32


def write_clip_tokenizer_files(folder: str) -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer from open_clip's BPE tables."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    vocab = {token: index for token, index in bpe.encoder.items()}
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n")


def write_hf_clip(folder: str, seed: int = 0, with_processor: bool = True) -> str:
    """A CLIPModel folder (224 px, patch 32, 2 layers each tower, 32-dim projection)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=CLIP_EMBED)
    model = randomize_(CLIPModel(config), seed).eval()
    model.save_pretrained(folder)
    if with_processor:
        write_clip_tokenizer_files(folder)
        tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
        processor.save_pretrained(folder)
    return folder


def tiny_open_clip(seed: int = 0, embed_dim: int = CLIP_EMBED):
    """open_clip's CLIP with OpenAI's layout (QuickGELU, 64-dim heads), 224 px, patch 32."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(embed_dim, CLIPVisionCfg(layers=2, width=64, patch_size=32, image_size=224, head_width=64),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2), quick_gelu=True)
    return randomize_(model, seed).eval()


def write_open_clip(path: str, seed: int = 0, embed_dim: int = CLIP_EMBED):
    """The state dict as .safetensors or (any other suffix) a weights-only torch file. -> model."""
    model = tiny_open_clip(seed, embed_dim)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return model


def write_hf_dino(folder: str, seed: int = 0) -> str:
    """DINO ViT layout (facebook/dino-vits16: patch 16, 224 px, no pooler), tiny width."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=256,
                       image_size=224, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True)
    randomize_(ViTModel(config, add_pooling_layer=False), seed).eval().save_pretrained(folder)
    return folder


def write_hf_dinov2(folder: str, seed: int = 0) -> str:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, mlp_ratio=4, image_size=518,
                          patch_size=14, layerscale_value=1.0)
    randomize_(Dinov2Model(config), seed).eval().save_pretrained(folder)
    return folder


def tiny_dino_hub(seed: int = 0):
    """DINO's ViT (timm VisionTransformer; DINO's hub files use these names), patch 16, 224 px."""
    import timm

    model = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=1, mlp_ratio=4, qkv_bias=True, num_classes=0)
    return randomize_(model, seed).eval()


def write_dino_hub(path: str, seed: int = 0):
    model = tiny_dino_hub(seed)
    torch.save(model.state_dict(), path)
    return model


def write_aesthetic_mlp(path: str, width: int = CLIP_EMBED, seed: int = 0):
    from trainer.evaluation.loaders import AestheticMLP

    head = randomize_(AestheticMLP(width), seed).eval()
    torch.save(head.state_dict(), path)
    return head


def write_aesthetic_linear(path: str, width: int = CLIP_EMBED, seed: int = 0):
    head = randomize_(torch.nn.Linear(width, 1), seed).eval()
    torch.save(head.state_dict(), path)
    return head
