"""The subject branch through the UNet patcher of Forge and reForge (docs/webui-host-notes.md, section 9).

Both forks sample through a "UNet patcher" (``sd_model.forge_objects.unet``): extensions
clone it in ``process_before_every_sampling`` and register attention patches on the clone.
An attn2 "replace" patch for a layer is called as ``patch(q, k, v, extra_options)`` with q,
k, v after the layer's ``to_q``/``to_k``/``to_v`` and returns the attention output, which the
host then passes through ``to_out``; the layer's own ``forward`` does not run. So on these
hosts the branch is one such patch per attn2 layer (``AttentionPatch``): it calls the patch
that was on the same key before it (the built-in IP-Adapter's, for one) or the host's own
attention function, and adds ``scale * Attn(Q, K_S, V_S)`` (``SubjectAttention.patched_branch``).

Keys: ``extra_options`` carries ``block`` = ("input" | "middle" | "output", block number)
and the transformer index; a patch is found under (name, number, index) first, then under
(name, number). ``install`` puts ours where the host would find the one it chains to.
``ensure_chained`` runs on every UNet call (from the session's UNet pre-hook): when a
patch registered after ours replaced it on a key without calling it, that call's options
get ours wrapped around it, so the order of the scripts does not matter; a patch already
inside a chain of ours passes through (never applied twice).
"""
from __future__ import annotations

import re
import sys
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

_LAYER_NAME = re.compile(r"^(?:(input_blocks|output_blocks)\.(\d+)|(middle_block))\.\d+\.transformer_blocks\.(\d+)\.attn2$")
_BLOCK = {"input_blocks": "input", "output_blocks": "output"}


def layer_key(name: str) -> Tuple[str, int, int]:
    """An attn2 module name of the ldm UNet layout -> (block name, block number, transformer
    index) as the patcher names it: ``input_blocks.4.1.transformer_blocks.0.attn2`` ->
    ("input", 4, 0); the middle block is ("middle", 0, i)."""
    m = _LAYER_NAME.match(name)
    if m is None:
        raise ValueError(f"not an attn2 layer of the ldm UNet layout: {name}")
    if m.group(3):
        return "middle", 0, int(m.group(4))
    return _BLOCK[m.group(1)], int(m.group(2)), int(m.group(4))


def unet_patcher(sd_model):
    """The host's UNet patcher (Forge, reForge), or None on a host without one (the WebUI)."""
    patcher = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    if patcher is None or not callable(getattr(patcher, "set_model_attn2_replace", None)) \
            or not callable(getattr(patcher, "clone", None)):
        return None
    return patcher


def serves_by_patches(sd_model) -> bool:
    """Whether the session serves the branch with attn2 replace patches on ``sd_model``'s UNet
    patcher (Forge, reForge) rather than with module hooks (the WebUI)."""
    return unet_patcher(sd_model) is not None


def patcher_unet(patcher):
    """The UNet module the patcher samples with (``patcher.model.diffusion_model``)."""
    return getattr(getattr(patcher, "model", None), "diffusion_model", None)


def percent_to_sigma(patcher) -> Optional[Callable[[float], float]]:
    """The host's ``percent_to_sigma`` of the patcher's model (reForge: ``model_sampling``,
    Forge: ``predictor``), or None."""
    model = getattr(patcher, "model", None)
    for name in ("model_sampling", "predictor"):
        fn = getattr(getattr(model, name, None), "percent_to_sigma", None)
        if callable(fn):
            return fn
    return None


def host_attention(layer) -> Callable:
    """The attention function the layer's own ``forward`` uses (``optimized_attention`` in
    reForge, ``attention_function`` in Forge, looked up in the layer's module when called, as
    the layer does), or PyTorch's SDPA on [B, N, heads * d] tensors."""
    module = sys.modules.get(type(layer).__module__)
    for name in ("optimized_attention", "attention_function"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return _sdpa


def _sdpa(q, k, v, heads, **kwargs):
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)


def find_patch(patches: Dict, key: Tuple[str, int, int]):
    """-> (the key the host would use for this layer, the patch there or None)."""
    for k in (key, key[:2]):
        if k in patches:
            return k, patches[k]
    return key[:2], None


class AttentionPatch:
    """The attn2 replace patch of one layer for one session (held weakly: a patch that
    outlives its generation only passes through)."""

    def __init__(self, session, index: int, layer, previous=None):
        self._session = weakref.ref(session)
        self.index = index
        self.previous = previous
        self._attention = host_attention(layer)

    def owned_by(self, session) -> bool:
        return self._session() is session

    def __call__(self, q, k, v, extra_options):
        session = self._session()
        busy = session is not None and session.patch_busy[self.index]
        if session is not None:
            session.patch_busy[self.index] = True
        try:
            if self.previous is not None:
                out = self.previous(q, k, v, extra_options)
            else:
                kwargs = {}
                if extra_options.get("attn_precision") is not None:
                    kwargs["attn_precision"] = extra_options["attn_precision"]
                out = self._attention(q, k, v, extra_options["n_heads"], **kwargs)
        finally:
            if session is not None and not busy:
                session.patch_busy[self.index] = False
        handle = None if session is None or busy else session.handle
        if handle is None:
            return out
        branch = handle.patched_branch(self.index, q, int(extra_options["n_heads"]))
        return out if branch is None else out + branch.to(out.dtype)


def _ours(patch, session) -> bool:
    return isinstance(patch, AttentionPatch) and patch.owned_by(session)


def _chain_start(patch, session):
    """A patch found on a key, without our own patches of earlier passes (the hires pass
    clones a patcher that may still carry the first pass's patches)."""
    while isinstance(patch, AttentionPatch) and (patch.owned_by(session) or patch._session() is None):
        patch = patch.previous
    return patch


def install(session, sd_model, layers: List[Tuple[str, torch.nn.Module]]):
    """Clone the UNet patcher, register one AttentionPatch per attn2 layer (chained to the
    patch on its key), and make the clone the model's patcher. -> (original, clone)."""
    original = unet_patcher(sd_model)
    clone = original.clone()
    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for index, (name, layer) in enumerate(layers):
        key = layer_key(name)
        found, previous = find_patch(existing, key)
        patch = AttentionPatch(session, index, layer, _chain_start(previous, session))
        clone.set_model_attn2_replace(patch, found[0], found[1], found[2] if len(found) == 3 else None)
    sd_model.forge_objects.unet = clone
    return original, clone


def restore(sd_model, original, clone) -> None:
    """Put the original patcher back if ours is still the model's (the hosts also reset
    ``forge_objects`` before every batch and pass)."""
    objects = getattr(sd_model, "forge_objects", None)
    if objects is not None and getattr(objects, "unet", None) is clone:
        objects.unet = original


def ensure_chained(session, transformer_options, layers) -> Optional[dict]:
    """-> transformer_options for this UNet call with our patch on every attn2 key (wrapping
    whatever is there when ours was replaced), or None when nothing needs to change."""
    patches = transformer_options.get("patches_replace", {}).get("attn2", {})
    missing = []
    for index, (name, layer) in enumerate(layers):
        key = layer_key(name)
        found, current = find_patch(patches, key)
        if not _ours(current, session):
            missing.append((index, layer, found, current))
    if not missing:
        return None
    attn2 = dict(patches)
    for index, layer, found, current in missing:
        attn2[found] = AttentionPatch(session, index, layer, current)
    options = dict(transformer_options)
    options["patches_replace"] = dict(options.get("patches_replace", {}))
    options["patches_replace"]["attn2"] = attn2
    return options
