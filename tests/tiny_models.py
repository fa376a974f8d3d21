"""Tiny random-initialised models of the real architectures, for tests anywhere in tests/.

No weights exist on the test machines, so every test builds small models with the real
module layouts (and therefore the real key names) and saves them in the real file formats.
All builders are deterministic (seeded) and return fp32 modules in eval mode.

Important: ldm and diffusers zero-initialise several layers (SpatialTransformer.proj_out,
ResBlock output convs, the final conv). With those zeros the attention layers have no
effect on the UNet output and attention tests pass vacuously, so ``randomize_`` overwrites
*every* parameter.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import nn

# Canonical SD1 attn2 widths (ssr.layers order) divided by 10: model_channels 32, mult (1, 2, 4, 4).
TINY_MODEL_CHANNELS = 32
TINY_CONTEXT_DIM = 32
TINY_SD1_WIDTHS = (32, 32, 64, 64, 128, 128, 128, 128, 128, 64, 64, 64, 32, 32, 32, 128)
TINY_CLIP_WIDTH = 128  # 2 heads of 64: single-file CLIP formats imply 64-dim heads
TINY_CLIP_HEADS = 2
TINY_CLIP_LAYERS = 24  # real depth: scales are blocks 4, 8, ..., 24
TINY_SSR_INNER = 64  # 8 heads (the loaders' fixed head count) of 8 dims
SUBJECT_TOKENS = 462  # 6 scales x 77 query tokens


def randomize_(module: nn.Module, seed: int = 0, gain: float = 1.0) -> nn.Module:
    """Overwrite every parameter in place: matrices/convs ~ N(0, gain^2/fan_in), 1-D
    ``*weight`` (norm scales) ~ 1 + N(0, 0.2^2), everything else (biases, CLS embedding)
    ~ N(0, 0.1^2). Keeps activations O(1) through residual stacks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                value = torch.randn(p.shape, generator=g) * (gain / fan_in ** 0.5)
            elif name.endswith("weight"):
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            else:
                value = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(value.to(p.dtype))
    return module


# ------------------------------------------------------------------------------- CLIP vision

def tiny_hf_clip_vision_config(width: int = TINY_CLIP_WIDTH, layers: int = TINY_CLIP_LAYERS,
                               heads: int = TINY_CLIP_HEADS):
    """transformers CLIPVisionConfig: 224 px, patch 14 (257 tokens), QuickGELU like OpenAI CLIP."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=224, patch_size=14,
                            hidden_act="quick_gelu", projection_dim=32)


def tiny_hf_clip_vision(seed: int = 0, **config_kwargs) -> nn.Module:
    """transformers ``CLIPVisionModel`` with every parameter randomised (eager attention)."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(tiny_hf_clip_vision_config(**config_kwargs))
    return randomize_(model, seed).eval()


def tiny_clip_image_encoder(seed: int = 0, width: int = TINY_CLIP_WIDTH, layers: int = TINY_CLIP_LAYERS,
                            heads: int = TINY_CLIP_HEADS):
    """``ssr.ClipImageEncoder`` (open_clip tower) with every parameter randomised."""
    from ssr.image_encoder import ClipImageEncoder, VisionConfig

    encoder = ClipImageEncoder(VisionConfig(width=width, layers=layers, heads=heads, output_dim=32))
    return randomize_(encoder, seed).eval()


# ------------------------------------------------------------------------------- SSR weights

def tiny_ssr_weights(seed: int = 0, context_dim: int = TINY_CONTEXT_DIM, image_dim: int = TINY_CLIP_WIDTH,
                     widths: Sequence[int] = TINY_SD1_WIDTHS, inner_dim: int = TINY_SSR_INNER, heads: int = 8):
    """``ssr.SSRWeights`` with the SD1 layer structure at tiny widths, randomised.

    context_dim is the UNet's cross-attention width (= the aligner's text width); use 768
    for files that must pass the loaders' SD1.x family check."""
    from ssr.subject_encoder import SubjectEncoderConfig
    from ssr.weights import SSRWeights

    config = SubjectEncoderConfig(text_dim=context_dim, image_dim=image_dim, inner_dim=inner_dim, heads=heads)
    return randomize_(SSRWeights(config, widths), seed).eval()


# ------------------------------------------------------------------------------- text encoder

def tiny_text_encoder(seed: int = 0, width: int = TINY_CONTEXT_DIM) -> Callable[[List[str]], torch.Tensor]:
    """texts -> [B, 77, width] with a tiny HF ``CLIPTextModel`` and CLIP's real BPE ids
    (the SD text encoder's role). The model is reachable as ``.model``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ssr.query_encoder import BpeQueryTokenizer, encode_queries

    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                         hidden_act="quick_gelu"))
    randomize_(model, seed).eval()
    tokenizer = BpeQueryTokenizer()

    def encode_text(texts: List[str]) -> torch.Tensor:
        return encode_queries(model, tokenizer, list(texts))

    encode_text.model = model
    encode_text.tokenizer = tokenizer
    return encode_text


# ------------------------------------------------------------------------------- UNets

def ldm_unet_sd1(model_channels: int = TINY_MODEL_CHANNELS, context_dim: int = TINY_CONTEXT_DIM,
                 attention_resolutions=(4, 2, 1), num_heads: int = 8, use_checkpoint: bool = False,
                 seed: int = 0, randomize: bool = True) -> nn.Module:
    """The ``ldm`` UNetModel with the SD1.x layout (v1-inference.yaml) at any width:
    channel_mult (1, 2, 4, 4), 2 res blocks, attention at ds 4/2/1, 8 heads, legacy=False.
    ``model_channels=320, context_dim=768`` is the real SD1.5 UNet."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
                     attention_resolutions=list(attention_resolutions), num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                     num_heads=num_heads, use_spatial_transformer=True, transformer_depth=1,
                     context_dim=context_dim, use_checkpoint=use_checkpoint, legacy=False)
    if randomize:
        randomize_(unet, seed)
    return unet.eval()


def diffusers_unet_sd1(model_channels: int = TINY_MODEL_CHANNELS, context_dim: int = TINY_CONTEXT_DIM,
                       seed: int = 0, randomize: bool = True) -> nn.Module:
    """diffusers ``UNet2DConditionModel`` with the SD1.x block layout (3 cross-attention
    down blocks + DownBlock2D, UpBlock2D + 3 cross-attention up blocks, 8 heads)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(model_channels * m for m in (1, 2, 4, 4)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=context_dim, attention_head_dim=8, norm_num_groups=min(32, model_channels))
    if randomize:
        randomize_(unet, seed)
    return unet.eval()


def unet_call(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One denoiser call for either UNet kind: x [B, 4, H, W], t [B], context [B, L, D] -> [B, 4, H, W]."""
    if hasattr(unet, "input_blocks"):
        return unet(x, timesteps=t, context=context)
    return unet(x, t, encoder_hidden_states=context).sample


def unet_inputs(batch: int, size: int = 16, context_dim: int = TINY_CONTEXT_DIM, tokens: int = 77, seed: int = 1):
    """Random (x [B, 4, size, size], t [B], context [B, tokens, context_dim])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(1, 999, (batch,), generator=g).float()
    context = torch.randn(batch, tokens, context_dim, generator=g)
    return x, t, context


class OpenAIClipLayout(nn.Module):
    """OpenAI's CLIP module layout: the vision tower as ``.visual`` (open_clip key names),
    text-tower tensors and ``logit_scale`` beside it."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.token_embedding = nn.Embedding(10, 16)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def forward(self, image):
        return self.visual(image) * self.logit_scale.exp()
