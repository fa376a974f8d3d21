"""Token-to-patch aligner and detail-preserving subject encoder (docs/method.md, section 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SubjectEncoderConfig:
    """Sizes of the aligner; defaults are the released SD1.5 / CLIP ViT-L/14 weights."""

    text_dim: int = 768  # SD text encoder width (query tokens and output tokens)
    image_dim: int = 1024  # CLIP vision width
    inner_dim: int = 512  # heads * head_dim
    heads: int = 8
    num_scales: int = 6

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.heads


class SubjectEncoder(nn.Module):
    """z_q [B, 77, text_dim] + z_1..z_6 [B, T, image_dim] -> c_s [B, 6*77, text_dim].

    One token-to-patch map A = softmax_T(Q K^T / sqrt(head_dim)) per head, with Q from the
    query tokens and K from the last (semantic) scale only, is shared by all scales:
    out_k = O_k(merge_heads(A V_k(z_k))); c_s = LayerNorm(concat_k out_k).
    """

    def __init__(self, config: SubjectEncoderConfig = SubjectEncoderConfig()):
        super().__init__()
        c = config
        self.config = c
        self.to_q = nn.Linear(c.text_dim, c.inner_dim, bias=False)
        self.to_k = nn.Linear(c.image_dim, c.inner_dim, bias=False)
        self.to_v = nn.ModuleList([nn.Linear(c.image_dim, c.inner_dim, bias=False) for _ in range(c.num_scales)])
        self.to_out = nn.ModuleList([nn.Linear(c.inner_dim, c.text_dim, bias=False) for _ in range(c.num_scales)])
        self.norm = nn.LayerNorm(c.text_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.config.heads, self.config.head_dim).transpose(1, 2)

    def token_to_patch(self, query: torch.Tensor, semantic: torch.Tensor,
                       logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [B, Lq, text_dim], semantic z_6 [B, T, image_dim], logit_bias [B, T] or [T]
        (added to every head's logits before the softmax) -> A [B, heads, Lq, T]."""
        q, k = self._heads(self.to_q(query)), self._heads(self.to_k(semantic))
        logits = torch.matmul(q, k.transpose(-1, -2)) * (self.config.head_dim ** -0.5)
        if logit_bias is not None:
            bias = logit_bias.to(logits.dtype).to(logits.device)
            logits = logits + (bias.view(1, 1, 1, -1) if bias.ndim == 1 else bias[:, None, None, :])
        return logits.softmax(dim=-1)

    def forward(self, query: torch.Tensor, image_states: List[torch.Tensor],
                logit_bias: Optional[torch.Tensor] = None, return_scales: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor] | Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """-> (c_s [B, num_scales*Lq, text_dim], A [B, heads, Lq, T]) and, with
        ``return_scales``, the per-scale outputs out_k [B, Lq, text_dim] before the LayerNorm
        (the trainer's token-wise regulariser needs them)."""
        if len(image_states) != self.config.num_scales:
            raise ValueError(f"expected {self.config.num_scales} image feature scales, got {len(image_states)}")
        if query.shape[0] != image_states[0].shape[0] and query.shape[0] == 1:
            query = query.expand(image_states[0].shape[0], -1, -1)
        attn = self.token_to_patch(query, image_states[-1], logit_bias)
        b, _, lq, _ = attn.shape
        scales = []
        for z, to_v, to_out in zip(image_states, self.to_v, self.to_out):
            v = self._heads(to_v(z.to(attn.dtype)))
            merged = torch.matmul(attn, v).transpose(1, 2).reshape(b, lq, self.config.inner_dim)
            scales.append(to_out(merged))
        subject = self.norm(torch.cat(scales, dim=1))
        return (subject, attn, scales) if return_scales else (subject, attn)


def attention_heatmap(attn: torch.Tensor, grid: int = 16, num_query_tokens: Optional[int] = None) -> torch.Tensor:
    """Token-to-patch map A [B, heads, Lq, T] -> [B, grid, grid] in [0,1]: how much the query
    looks at each patch, averaged over heads and the first ``num_query_tokens`` query tokens
    (e.g. BOS + words + EOS; default all 77), CLS dropped, normalised to max 1 per image."""
    a = attn.float().mean(dim=1)
    if num_query_tokens:
        a = a[:, :num_query_tokens]
    patches = a.mean(dim=1)[:, 1:]
    patches = patches / patches.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return patches.reshape(-1, grid, grid)


def upsample_heatmap(heatmap: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """[B, g, g] -> [B, H, W] bilinear, for overlays."""
    return F.interpolate(heatmap[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
