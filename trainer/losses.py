"""The embedding-consistency regulariser L_reg in its two forms (docs/method.md, section 8).

Both compare subject embeddings with the query's text embedding z_q token by token
(token t of each scale against query token t) as a cosine distance 1 - cos, averaged over
batch rows and the 77 tokens. z_q comes from the frozen text encoder and is detached.

- "reference" (the reference trainer, which produced the released weights; our default):
  sum over the K scales of the token-wise mean of 1 - cos(out_k[t], z_q[t]), with out_k
  the per-scale outputs *before* the final LayerNorm.
- "paper": 1 - cos of the *mean over scales* of the subject embedding c_s (after the
  LayerNorm, i.e. the tokens the UNet sees) against z_q, token-wise mean.

``rows`` limits the mean to some batch rows. The trainer leaves out rows whose subject was
dropped (zero CLIP input, "" query): there z_q is the empty text's embedding, and the term
would pull the unconditional subject embedding (CFG's negative) towards it, a constraint
the method does not ask for (docs/training.md, "What is optimised").
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

REGULARIZERS = ("reference", "paper")
DEFAULT_TAU = {"reference": 0.1, "paper": 0.01}


def regularizer_reference(scale_outputs: Sequence[torch.Tensor], z_q: torch.Tensor,
                          rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scale_outputs: K tensors out_k [B, L, D]; z_q [B, L, D]; rows [B] bool (None: all)
    -> scalar sum_k mean_{b in rows, t} (1 - cos(out_k[b, t], z_q[b, t])); 0 without rows."""
    if rows is not None:
        if not bool(rows.any()):
            return _no_rows(z_q)
        scale_outputs, z_q = [out[rows] for out in scale_outputs], z_q[rows]
    target = z_q.detach().float()
    return torch.stack([(1.0 - F.cosine_similarity(out.float(), target, dim=-1)).mean()
                        for out in scale_outputs]).sum()


def regularizer_paper(subject: torch.Tensor, z_q: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """subject c_s [B, K*L, D] (K scales of L tokens, concatenated along tokens); z_q [B, L, D];
    rows [B] bool (None: all) -> scalar mean_{b in rows, t} (1 - cos(mean_k c_s[b, k*L + t], z_q[b, t]));
    0 without rows."""
    b, kl, d = subject.shape
    length = z_q.shape[1]
    if kl % length:
        raise ValueError(f"subject tokens ({kl}) are not a whole number of {length}-token scales")
    if rows is not None:
        if not bool(rows.any()):
            return _no_rows(z_q)
        subject, z_q = subject[rows], z_q[rows]
        b = subject.shape[0]
    mean_over_scales = subject.float().view(b, kl // length, length, d).mean(dim=1)
    return (1.0 - F.cosine_similarity(mean_over_scales, z_q.detach().float(), dim=-1)).mean()


def _no_rows(like: torch.Tensor) -> torch.Tensor:
    # No row takes part (every subject in the batch was dropped): the term is absent.
    return torch.zeros((), device=like.device, dtype=torch.float32)
