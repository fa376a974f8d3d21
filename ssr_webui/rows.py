"""Which subject context each row of a UNet call gets, under every CFG row layout of the WebUI.

Cond rows get the subjects' tokens, uncond rows the unconditional subject embedding
(docs/method.md, section 6). The WebUI's ``CFGDenoiser`` (docs/webui-host-notes.md, section 6) lays rows out as
"all cond rows (one per image and AND sub-prompt), then one uncond row per image", but may
split them over several UNet calls (chunks that can mix cond and uncond, a separate call for
an uncond of another token length) or skip the uncond rows. So the decision is made per row,
per call, from what the call itself carries:

0. The host's own marks, where it gives them: Forge and reForge pass
   ``transformer_options["cond_or_uncond"]`` to the UNet, one entry per equal-size chunk of
   the batch (0 = cond, 1 = uncond; they batch uncond first). ``rows_from_marks`` reads them
   and nothing below is used for such a call.

1. ControlNet's marker token, when present: sd-webui-controlnet prepends one token to every
   cond (all +1024) and uncond (all -1024) before sampling and strips it inside its UNet forward.
2. An exact match of the row's context against the step's cond rows and uncond rows, as
   ``on_cfg_denoiser`` reported them. Both are cast to the call's dtype (the WebUI casts the
   context to the UNet's dtype) and compared over their common token length, because the
   denoiser pads the shorter of cond/uncond with empty-prompt chunks (``pad_cond_uncond``) or
   repeats/truncates it (``pad_cond_uncond_v0``) after the callback has run.
3. If a row matches both (prompt and negative prompt identical) or neither (another extension
   rewrote the context), its position decides: the denoiser feeds the step's rows in order,
   cond rows first, so the count of rows already seen in this step says which one it is.
   A row past the step's rows that matched nothing gets no branch.
"""
from __future__ import annotations

from collections import Counter
from typing import List, Optional

import torch

SUBJECT, UNCONDITIONAL = 0, 1  # context indices of ssr.EncodedSubjects.tokens

CONTROLNET_MARK = 1024.0  # sd-webui-controlnet hook.py: POSITIVE_MARK_TOKEN
CONTROLNET_MARK_EPS = 1e-3


def _crossattn(cond) -> Optional[torch.Tensor]:
    """A text_cond / text_uncond from on_cfg_denoiser -> [N, L, D] tensor (dict conds: 'crossattn')."""
    if isinstance(cond, dict):
        cond = cond.get("crossattn")
    return cond if isinstance(cond, torch.Tensor) and cond.ndim == 3 else None


def controlnet_marks(context: torch.Tensor) -> Optional[List[bool]]:
    """context [B, L, D] -> per row True (cond) / False (uncond) when every row starts with
    ControlNet's marker token, else None."""
    if context.ndim != 3 or context.shape[1] < 2:
        return None
    first = context[:, 0, :].float()
    if float((first.abs() - CONTROLNET_MARK).abs().mean()) >= CONTROLNET_MARK_EPS:
        return None
    negative = (first + CONTROLNET_MARK).abs().mean(dim=1) < CONTROLNET_MARK_EPS
    return [not bool(n) for n in negative.tolist()]


def rows_matching(context: torch.Tensor, known: Optional[torch.Tensor]) -> torch.Tensor:
    """context [B, L, D], known [N, L', D] -> bool [B]: row b equals some known row over the
    first min(L, L') tokens, after casting ``known`` to the context's dtype and device."""
    hit = torch.zeros(context.shape[0], dtype=torch.bool)
    if known is None or known.shape[0] == 0 or known.shape[-1] != context.shape[-1]:
        return hit
    n = min(context.shape[1], known.shape[1])
    ctx = context[:, :n]
    known = known[:, :n].to(device=context.device, dtype=context.dtype)
    found = torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
    for row in known:  # one known row at a time: memory stays at one [B, n, D] comparison
        found |= (ctx == row).flatten(1).all(dim=1)
    return found.cpu()


HOST_COND, HOST_UNCOND = 0, 1  # the values of Forge's / reForge's cond_or_uncond entries


def rows_from_marks(marks, batch: int) -> Optional[List[Optional[int]]]:
    """The host's ``cond_or_uncond`` (one 0/1 entry per equal-size chunk of the batch) ->
    a context index per row (SUBJECT for cond, UNCONDITIONAL for uncond, None for anything
    else), or None when ``marks`` is not a usable list for ``batch`` rows."""
    if not isinstance(marks, (list, tuple)) or not marks or batch % len(marks):
        return None
    per_chunk = batch // len(marks)
    rows: List[Optional[int]] = []
    for mark in marks:
        ctx = SUBJECT if mark == HOST_COND else UNCONDITIONAL if mark == HOST_UNCOND else None
        rows.extend([ctx] * per_chunk)
    return rows


class RowRouter:
    """Per sampling step ``begin_step(text_cond, text_uncond)``; per UNet call
    ``route(context [B, L, D])`` -> a context index per row (SUBJECT, UNCONDITIONAL or None).

    ``decisions`` counts how rows were decided ("host", "marker", "match", "position",
    "none"), which tests and diagnostics read. ``route(context, marks)`` with the host's
    ``cond_or_uncond`` uses those marks alone."""

    def __init__(self):
        self.cond: Optional[torch.Tensor] = None
        self.uncond: Optional[torch.Tensor] = None
        self.rows_seen = 0
        self.in_step = False
        self.decisions: Counter = Counter()

    def begin_step(self, text_cond, text_uncond) -> None:
        self.cond, self.uncond = _crossattn(text_cond), _crossattn(text_uncond)
        self.rows_seen = 0
        self.in_step = True

    def end_step(self) -> None:
        self.cond = self.uncond = None
        self.in_step = False

    def _by_position(self, position: int) -> Optional[int]:
        n_cond = 0 if self.cond is None else self.cond.shape[0]
        n_uncond = 0 if self.uncond is None else self.uncond.shape[0]
        if position < n_cond:
            return SUBJECT
        if position < n_cond + n_uncond:
            return UNCONDITIONAL
        return None

    def route(self, context: Optional[torch.Tensor], marks=None) -> List[Optional[int]]:
        if not isinstance(context, torch.Tensor) or context.ndim != 3:
            return []
        batch = context.shape[0]
        first = self.rows_seen
        self.rows_seen += batch
        by_host = rows_from_marks(marks, batch)
        if by_host is not None:
            self.decisions["host"] += batch
            return by_host
        if not self.in_step:
            self.decisions["none"] += batch
            return [None] * batch
        marks = controlnet_marks(context)
        if marks is not None:
            self.decisions["marker"] += batch
            return [SUBJECT if m else UNCONDITIONAL for m in marks]
        is_cond = rows_matching(context, self.cond).tolist()
        is_uncond = rows_matching(context, self.uncond).tolist()
        rows: List[Optional[int]] = []
        for r in range(batch):
            if is_cond[r] != is_uncond[r]:
                rows.append(SUBJECT if is_cond[r] else UNCONDITIONAL)
                self.decisions["match"] += 1
                continue
            by_position = self._by_position(first + r)
            if by_position is None and is_cond[r]:
                by_position = UNCONDITIONAL  # identical texts after the step's rows: a guidance-style extra call
            rows.append(by_position)
            self.decisions["position" if by_position is not None else "none"] += 1
        return rows
