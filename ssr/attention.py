"""The subject cross-attention branch, installed into a UNet's attn2 layers with hooks.

For every attn2 layer (docs/method.md, section 6):
    O = to_out( Attn(Q, K(c_t), V(c_t)) + scale * Attn(Q, K_S(c_s), V_S(c_s)) )
with Q the layer's own query. No UNet code is changed; three hooks per layer do it:
- a forward hook on ``to_q`` keeps the query the layer computed (no second projection);
- a forward pre-hook on ``to_out[0]`` adds ``scale * subject attention`` to its input
  (before the output projection, so no extra matmul);
- a forward hook on the attn2 module itself is the fallback: if some replaced ``forward``
  (a WebUI attention optimisation, ControlNet's IP-Adapter, ...) did not call ``to_q`` and
  ``to_out[0]`` in the usual way, the branch is added to the layer output instead, as
  ``scale * to_out[0].weight @ subject_attention`` (equal, since ``to_out[0]`` is linear).
Hooks run around whatever ``forward`` is installed, at class level or per instance.

Hosts with their own attention patches (Forge, reForge: an attn2 "replace" patch gets q/k/v
after the projections and the layer's ``forward`` never runs) serve the branch from such a
patch instead: ``SubjectAttention.attach(unet, weights)`` validates the layers without
installing hooks, and the patch calls ``patched_branch(index, q, heads)``.

Rows: each UNet call's batch rows pick a context by index (or ``None``: no branch), so any
cond/uncond layout can be served. Subject K_S/V_S are projected once per context (per dtype
and device) and reused across steps.

Accounting: ``served[i]`` counts the calls in which layer i added the branch, ``bypassed[i]``
the calls in which its ``to_q`` ran while the branch was on but its own ``forward`` did not
(something called the projections directly): the host glue compares them with the calls it
expected, so that a branch that was armed but never ran is reported, not claimed.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .layers import family_label, find_cross_attention_layers

Rows = Optional[Union[Sequence[Optional[int]], Callable[[int], Sequence[Optional[int]]]]]


class SubjectKV(nn.Module):
    """K_S, V_S of one attn2 layer: Linear(context_dim -> width), no bias."""

    def __init__(self, width: int, context_dim: int = 768):
        super().__init__()
        self.to_k = nn.Linear(context_dim, width, bias=False)
        self.to_v = nn.Linear(context_dim, width, bias=False)


class SubjectAttentionWeights(nn.ModuleList):
    """The K_S/V_S pairs of all attn2 layers, in the canonical order (``layers.py``)."""

    def __init__(self, widths: Sequence[int], context_dim: int = 768):
        super().__init__([SubjectKV(w, context_dim) for w in widths])

    @property
    def widths(self) -> List[int]:
        return [m.to_k.out_features for m in self]

    @property
    def context_dim(self) -> int:
        return self[0].to_k.in_features


class IncompatibleUNetError(ValueError):
    """The UNet does not match the SSR weights (layer count, context or layer widths)."""


def check_compatible(layers: Sequence[Tuple[str, nn.Module]], weights: SubjectAttentionWeights) -> None:
    """Raise IncompatibleUNetError naming what differs and the likely model family."""
    if not layers:
        raise IncompatibleUNetError("no cross-attention (attn2) layers found in this UNet")
    ctx = layers[0][1].to_k.in_features
    if ctx != weights.context_dim:
        raise IncompatibleUNetError(
            f"the loaded model's cross-attention context is {ctx}-dim ({family_label(ctx)}), "
            f"but the SSR weights are for a {weights.context_dim}-dim context "
            f"({family_label(weights.context_dim)}); load an SD1.x checkpoint")
    if len(layers) != len(weights):
        raise IncompatibleUNetError(
            f"the UNet has {len(layers)} cross-attention layers, the SSR weights have {len(weights)}")
    for (name, layer), width in zip(layers, weights.widths):
        if layer.to_q.out_features != width:
            raise IncompatibleUNetError(f"layer {name} is {layer.to_q.out_features} wide, SSR weights expect {width}")


class _LayerState:
    """Per-layer scratch for one attn2 call: the captured query and whether it was used."""

    __slots__ = ("armed", "query", "applied")

    def __init__(self):
        self.armed, self.query, self.applied = False, None, False


class SubjectAttention:
    """Handle returned by ``install_subject_attention``; controls and removes the branch.

    Per generation: ``set_context(tokens [S, M, D], value_weights)``. Per UNet call:
    ``set_rows(rows)`` where ``rows[r]`` is the context index for batch row r or None
    (``rows=None``: row r uses context r, e.g. training with one subject per row).
    ``scale`` is lambda; ``enabled`` switches the branch off without removing it.
    """

    def __init__(self, unet: nn.Module, weights: SubjectAttentionWeights, scale: float = 1.0):
        self.unet = unet
        self.weights = weights
        self.scale = float(scale)
        self.enabled = True
        self.layers = find_cross_attention_layers(unet)
        check_compatible(self.layers, weights)
        self._tokens: Optional[torch.Tensor] = None
        self._value_weights: Optional[torch.Tensor] = None
        self._rows: Rows = None
        self._kv: Dict[Tuple[int, torch.dtype, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._states = [_LayerState() for _ in self.layers]
        self._hooks: List = []
        self.attached = False  # served by the host's attention patches instead of hooks
        self.fallback_calls = 0  # how often the output-side fallback had to run (diagnostics)
        self.served = [0] * len(self.layers)
        self.bypassed = [0] * len(self.layers)

    # ------------------------------------------------------------------ control
    def set_context(self, tokens: Optional[torch.Tensor], value_weights: Optional[torch.Tensor] = None) -> None:
        """tokens [S, M, D] (S contexts of M tokens, e.g. S=2: subject, unconditional);
        value_weights [M] or [S, M] multiply each token's value (per-subject weights), or None.
        No tokens (M = 0, e.g. every subject has weight 0) is no context: the branch is not
        applied. Clears the projected K/V cache."""
        if tokens is not None:
            if tokens.ndim == 2:
                tokens = tokens[None]
            if tokens.ndim != 3 or tokens.shape[-1] != self.weights.context_dim:
                raise ValueError(f"subject tokens must be [S, M, {self.weights.context_dim}], got {tuple(tokens.shape)}")
            if value_weights is not None and value_weights.shape[-1] != tokens.shape[1]:
                raise ValueError(f"value_weights must have {tokens.shape[1]} entries per context, got {tuple(value_weights.shape)}")
            if tokens.shape[1] == 0:
                tokens, value_weights = None, None
        self._tokens, self._value_weights = tokens, value_weights
        self._kv.clear()

    def set_rows(self, rows: Rows) -> None:
        self._rows = rows

    @property
    def active(self) -> bool:
        return self.enabled and self.scale != 0.0 and self._tokens is not None and (bool(self._hooks) or self.attached)

    def reset_counts(self) -> None:
        self.served = [0] * len(self.layers)
        self.bypassed = [0] * len(self.layers)
        self.fallback_calls = 0

    # ------------------------------------------------------------------ computation
    def _row_contexts(self, batch: int) -> List[Optional[int]]:
        rows = self._rows(batch) if callable(self._rows) else self._rows
        if rows is None:
            rows = list(range(batch))
            if self._tokens.shape[0] not in (1, batch):
                raise RuntimeError(f"subject attention: {self._tokens.shape[0]} contexts for a batch of {batch} rows; call set_rows")
            if self._tokens.shape[0] == 1:
                rows = [0] * batch
        rows = list(rows)
        if len(rows) != batch:
            raise RuntimeError(f"subject attention: the UNet was called with {batch} rows, but rows for {len(rows)} were set")
        contexts = self._tokens.shape[0]
        bad = [c for c in rows if c is not None and not 0 <= c < contexts]
        if bad:  # else index_select fails obscurely, or a single context silently serves any index
            raise RuntimeError(f"subject attention: rows name context index {bad[0]}, but set_context was given "
                               f"{contexts} (indices 0..{contexts - 1})")
        return rows

    def _projected(self, index: int, heads: int, dtype: torch.dtype, device: torch.device):
        """-> K_S, V_S [S, heads, M, head_dim] for layer ``index``, cached per dtype/device.

        Not cached while autograd records them (training): a cached K/V would tie every call
        to the first call's graph, and gradient checkpointing's recomputation would then save
        different tensors than the original forward (torch CheckpointError)."""
        key = (index, dtype, device)
        kv = self.weights[index]
        recording = torch.is_grad_enabled() and (self._tokens.requires_grad or kv.to_k.weight.requires_grad
                                                 or kv.to_v.weight.requires_grad)
        if recording or key not in self._kv:
            tokens = self._tokens.to(device)
            k = F.linear(tokens.to(kv.to_k.weight.dtype), kv.to_k.weight.to(device))
            v = F.linear(tokens.to(kv.to_v.weight.dtype), kv.to_v.weight.to(device))
            if self._value_weights is not None:
                w = self._value_weights.to(device=device, dtype=v.dtype)
                v = v * (w[None, :, None] if w.ndim == 1 else w[:, :, None])
            s, m, c = k.shape
            projected = tuple(t.to(dtype).view(s, m, heads, c // heads).transpose(1, 2) for t in (k, v))
            if recording:
                return projected
            self._kv[key] = projected
        return self._kv[key]

    def subject_attention(self, index: int, layer: Optional[nn.Module], query: torch.Tensor,
                          heads: Optional[int] = None) -> Optional[torch.Tensor]:
        """query [B, N, C] (the layer's to_q output) -> Attn(Q, K_S, V_S) [B, N, C] with zeros in
        rows without a context, or None when no row has one. ``heads``: the layer's head
        count (default ``layer.heads``).

        Rows are served in runs of consecutive rows sharing a context (cond rows, then uncond
        rows, in the WebUI), by slicing: no index tensor is built, so nothing waits on a
        host-to-device copy inside the sampling loop.
        """
        batch, n, c = query.shape
        rows = self._row_contexts(batch)
        if all(r is None for r in rows):
            return None
        heads = int(heads if heads is not None else layer.heads)
        k, v = self._projected(index, heads, query.dtype, query.device)
        q = query.reshape(batch, n, heads, c // heads).transpose(1, 2)
        if rows == list(range(k.shape[0])):  # one context per row (training)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n, c)
        pieces, start = [], 0
        while start < batch:
            end = start + 1
            while end < batch and rows[end] == rows[start]:
                end += 1
            ctx = rows[start]
            if ctx is None:
                pieces.append(query.new_zeros(end - start, n, c))
            else:
                kk = k[ctx:ctx + 1].expand(end - start, -1, -1, -1)
                vv = v[ctx:ctx + 1].expand(end - start, -1, -1, -1)
                out = F.scaled_dot_product_attention(q[start:end], kk, vv)
                pieces.append(out.transpose(1, 2).reshape(end - start, n, c))
            start = end
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def patched_branch(self, index: int, query: torch.Tensor, heads: int) -> Optional[torch.Tensor]:
        """For a host attention patch of layer ``index`` (attached handle): query [B, N, C] after
        ``to_q`` -> ``scale * Attn(Q, K_S, V_S)`` to add to the attention output before
        ``to_out``, or None when the branch is off or no row has a context. Counts as served."""
        if not self.active:
            return None
        branch = self.subject_attention(index, None, query, heads)
        if branch is None:
            return None
        self.served[index] += 1
        return self.scale * branch.to(query.dtype)

    # ------------------------------------------------------------------ hooks
    def _hooks_for(self, index: int, layer: nn.Module):
        state = self._states[index]

        def arm(module, args):
            state.armed, state.query, state.applied = self.active, None, False

        def keep_query(module, args, output):
            if state.armed and state.query is None:
                state.query = output
            elif not state.armed and self.active:  # the projections ran without the layer's forward
                self.bypassed[index] += 1

        def add_before_out(module, args):
            q = state.query
            if not state.armed or state.applied or q is None or not args or args[0].shape != q.shape:
                return None
            state.applied = True
            branch = self.subject_attention(index, layer, q)
            if branch is None:
                return None
            self.served[index] += 1
            return (args[0] + self.scale * branch.to(args[0].dtype),) + tuple(args[1:])

        def fallback(module, args, kwargs, output):
            try:
                if not state.armed or state.applied or not isinstance(output, torch.Tensor):
                    return None
                x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
                branch = self.subject_attention(index, layer, layer.to_q(x))
                if branch is None:
                    return None
                self.fallback_calls += 1
                self.served[index] += 1
                proj = layer.to_out[0].weight
                return output + self.scale * F.linear(branch.to(proj.dtype), proj).to(output.dtype)
            finally:
                state.armed, state.query = False, None

        return [
            layer.register_forward_pre_hook(arm),
            layer.to_q.register_forward_hook(keep_query),
            layer.to_out[0].register_forward_pre_hook(add_before_out),
            layer.register_forward_hook(fallback, with_kwargs=True),
        ]

    def _install(self) -> "SubjectAttention":
        for index, (_, layer) in enumerate(self.layers):
            self._hooks.extend(self._hooks_for(index, layer))
        self.unet._ssr_subject_attention = self
        return self

    @classmethod
    def attach(cls, unet: nn.Module, weights: SubjectAttentionWeights, scale: float = 1.0) -> "SubjectAttention":
        """A handle for a host that serves the branch from its own attention patches
        (``patched_branch``): the layers are validated, no hook is installed. ``remove()``
        detaches it (every later ``patched_branch`` returns None)."""
        handle = cls(unet, weights, scale)
        handle.attached = True
        return handle

    def remove(self) -> None:
        """Remove every hook and forget the context; safe to call more than once."""
        self.attached = False
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.set_context(None)
        self._rows = None
        for state in self._states:
            state.armed, state.query, state.applied = False, None, False
        if getattr(self.unet, "_ssr_subject_attention", None) is self:
            del self.unet._ssr_subject_attention

    @property
    def installed(self) -> bool:
        return bool(self._hooks) or self.attached

    def __enter__(self) -> "SubjectAttention":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_subject_attention(unet: nn.Module, weights: SubjectAttentionWeights, scale: float = 1.0) -> SubjectAttention:
    """Add the subject branch to every attn2 layer of an ``ldm`` UNetModel or a diffusers
    UNet2DConditionModel. Checks layer count and widths first (nothing is installed on
    error). An earlier installation on the same UNet is removed first, so the branch is
    never applied twice. Returns the handle; ``handle.remove()`` restores the UNet."""
    previous = getattr(unet, "_ssr_subject_attention", None)
    handle = SubjectAttention(unet, weights, scale)  # validates before touching anything
    if previous is not None:
        previous.remove()
    return handle._install()


def installed_subject_attention(unet: nn.Module) -> Optional[SubjectAttention]:
    """The handle currently installed on ``unet``, if any (to clean up after a crash)."""
    return getattr(unet, "_ssr_subject_attention", None)
