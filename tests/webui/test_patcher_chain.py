"""The attn2 replace patches of the forks' path (ssr_webui/patcher.py) without a host: which
key a layer's patch goes under, chaining to the patch found there, ``ensure_chained`` wrapping
a patch that replaced ours after we registered (either script order), and a patch of a
finished session passing through. The real forks run the same code in
tests/realhost_forks."""
from __future__ import annotations

import gc

import torch

from ssr_webui import patcher

HEADS = 2
LAYERS = [("input_blocks.1.1.transformer_blocks.0.attn2", torch.nn.Identity()),
          ("middle_block.1.transformer_blocks.0.attn2", torch.nn.Identity())]


class _Handle:
    """What a patch asks of the session's SubjectAttention: the branch for a layer's query."""

    def __init__(self):
        self.calls = []

    def patched_branch(self, index, q, heads):
        self.calls.append(index)
        return torch.full_like(q, float(index + 1))


class _Session:
    def __init__(self):
        self.handle = _Handle()
        self.patch_busy = [False] * len(LAYERS)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 5, 8, generator=g) for _ in range(3))


def _options(attn2):
    return {"patches_replace": {"attn2": attn2}, "cond_or_uncond": [1, 0]}


def _foreign(q, k, v, extra):
    return 1.1 * patcher._sdpa(q, k, v, extra["n_heads"])


def test_layer_keys_and_lookup_order():
    assert patcher.layer_key(LAYERS[0][0]) == ("input", 1, 0)
    assert patcher.layer_key(LAYERS[1][0]) == ("middle", 0, 0)
    three, two = ("input", 1, 0), ("input", 1)
    assert patcher.find_patch({two: "b", three: "a"}, three) == (three, "a")  # the three-part key first
    assert patcher.find_patch({two: "b"}, three) == (two, "b")
    assert patcher.find_patch({}, three) == (two, None)


def test_ours_everywhere_needs_no_change():
    session = _Session()
    attn2 = {patcher.layer_key(n)[:2]: patcher.AttentionPatch(session, i, layer) for i, (n, layer) in enumerate(LAYERS)}
    assert patcher.ensure_chained(session, _options(attn2), LAYERS) is None


def test_a_patch_that_replaced_ours_is_wrapped_for_the_call():
    session = _Session()
    key0, key1 = (patcher.layer_key(n)[:2] for n, _ in LAYERS)
    ours1 = patcher.AttentionPatch(session, 1, LAYERS[1][1])
    options = _options({key0: _foreign, key1: ours1})
    chained = patcher.ensure_chained(session, options, LAYERS)
    assert options["patches_replace"]["attn2"][key0] is _foreign  # the host's dict is not changed
    wrapped = chained["patches_replace"]["attn2"][key0]
    assert isinstance(wrapped, patcher.AttentionPatch) and wrapped.previous is _foreign
    assert chained["patches_replace"]["attn2"][key1] is ours1
    assert chained["cond_or_uncond"] == [1, 0]
    q, k, v = _qkv()
    extra = {"n_heads": HEADS}
    torch.testing.assert_close(wrapped(q, k, v, extra), _foreign(q, k, v, extra) + 1.0)
    assert session.handle.calls == [0]
    assert patcher.ensure_chained(session, chained, LAYERS) is None  # wrapped once, never twice


def test_without_a_patch_the_host_attention_is_the_base():
    session = _Session()
    patch = patcher.AttentionPatch(session, 1, LAYERS[1][1])
    q, k, v = _qkv(1)
    want = patcher._sdpa(q, k, v, HEADS) + 2.0
    torch.testing.assert_close(patch(q, k, v, {"n_heads": HEADS}), want)


def test_a_patch_of_a_finished_session_passes_through():
    session = _Session()
    patch = patcher.AttentionPatch(session, 0, LAYERS[0][1], previous=_foreign)
    del session
    gc.collect()
    q, k, v = _qkv(2)
    extra = {"n_heads": HEADS}
    assert torch.equal(patch(q, k, v, extra), _foreign(q, k, v, extra))
