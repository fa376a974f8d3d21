"""Issue 12 (a), shared by every host: rows from the host's own cond/uncond marks, and "never
silently not applied": the session knows how many layer calls served the branch and reports
"not applied" when it was armed but no layer (or not every layer) ran it.

The UNet is a tiny real ``ldm`` UNetModel with every parameter randomised. The bypass is
forced the way Forge and reForge run an attn2 replace patch: the transformer block calls
the layer's ``to_q``/``to_k``/``to_v`` and ``to_out`` itself and never the layer's forward.
"""
from __future__ import annotations

import types
from types import SimpleNamespace

import pytest
import torch

import ssr
from ssr_webui import infotext
from ssr_webui import runtime as rt
from ssr_webui.rows import SUBJECT, UNCONDITIONAL, RowRouter, rows_from_marks
from ssr_webui.session import GenerationSession
from tests import tiny_models as tm


# ----------------------------------------------------------------------------- rows from marks

def test_rows_from_marks_one_entry_per_chunk():
    assert rows_from_marks([1, 0], 4) == [UNCONDITIONAL, UNCONDITIONAL, SUBJECT, SUBJECT]
    assert rows_from_marks([0], 3) == [SUBJECT] * 3
    assert rows_from_marks([1], 1) == [UNCONDITIONAL]  # uncond in its own call
    assert rows_from_marks([0, 1, 0], 3) == [SUBJECT, UNCONDITIONAL, SUBJECT]
    assert rows_from_marks([0, 2], 2) == [SUBJECT, None]  # a mark we do not know: no branch
    assert rows_from_marks([1, 0], 3) is None  # chunks of unequal size: not usable
    assert rows_from_marks(None, 2) is None and rows_from_marks([], 2) is None


def test_router_uses_host_marks_when_prompt_equals_negative_prompt():
    """Identical cond and uncond: position would say cond first; the host batches uncond first
    and says so."""
    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 77, 8, generator=g)
    router = RowRouter()
    router.begin_step(same, same)
    context = torch.cat([same, same])
    assert router.route(context, marks=[1, 0]) == [UNCONDITIONAL, SUBJECT]
    assert router.decisions["host"] == 2 and router.decisions["position"] == 0
    router.begin_step(same, same)
    assert router.route(context) == [SUBJECT, UNCONDITIONAL]  # without marks: the WebUI's order


def test_router_marks_work_outside_a_denoiser_step():
    """Forks need no on_cfg_denoiser step for the marks to decide; separate cond and uncond
    calls and a skipped uncond each get their own rows."""
    router = RowRouter()
    ctx = torch.zeros(2, 77, 8)
    assert router.route(ctx, marks=[0]) == [SUBJECT, SUBJECT]
    assert router.route(ctx[:1], marks=[1]) == [UNCONDITIONAL]


# ----------------------------------------------------------------------------- served accounting

def _bypass_attn2(unet):
    """Make every transformer block run its attn2 as a replace-patch host does (projections
    and to_out called directly, with the plain attention in between). -> restore()."""
    from ldm.modules.attention import BasicTransformerBlock

    originals = []
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            def _forward(self, x, context=None):
                x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
                attn = self.attn2
                n = self.norm2(x)
                q, k, v = attn.to_q(n), attn.to_k(context), attn.to_v(context)
                b, _, c = q.shape
                h = attn.heads
                q, k, v = (t.reshape(b, -1, h, c // h).transpose(1, 2) for t in (q, k, v))
                a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
                x = attn.to_out(a) + x
                return self.ff(self.norm3(x)) + x
            originals.append((module, module._forward))
            module._forward = types.MethodType(_forward, module)

    def restore():
        for module, fwd in originals:
            module._forward = fwd
    return restore


@pytest.fixture(scope="module")
def unet():
    return tm.ldm_unet_sd1(seed=2)


@pytest.fixture(scope="module")
def weights():
    return tm.tiny_ssr_weights(seed=3)


def _tokens(seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, tm.TINY_CONTEXT_DIM, generator=g)


def test_every_layer_counts_what_it_served(unet, weights):
    x, t, ctx = tm.unet_inputs(2)
    with ssr.install_subject_attention(unet, weights.attention, 0.7) as handle:
        handle.set_context(_tokens())
        handle.set_rows([SUBJECT, UNCONDITIONAL])
        with torch.no_grad():
            tm.unet_call(unet, x, t, ctx)
        assert handle.served == [1] * 16 and handle.bypassed == [0] * 16
        handle.enabled = False
        with torch.no_grad():
            tm.unet_call(unet, x, t, ctx)
        assert handle.served == [1] * 16  # switched off: nothing served, nothing counted as bypassed
        assert handle.bypassed == [0] * 16


def test_a_bypassed_forward_serves_nothing_and_is_seen(unet, weights):
    x, t, ctx = tm.unet_inputs(2)
    restore = _bypass_attn2(unet)
    try:
        with ssr.install_subject_attention(unet, weights.attention, 0.7) as handle:
            handle.set_context(_tokens())
            handle.set_rows([SUBJECT, UNCONDITIONAL])
            with torch.no_grad():
                tm.unet_call(unet, x, t, ctx)
            assert handle.served == [0] * 16
            assert handle.bypassed == [1] * 16
    finally:
        restore()


def test_patched_branch_of_an_attached_handle(unet, weights):
    """Attached (no hooks): the UNet is untouched, the patch entry point adds scale * branch."""
    x, t, ctx = tm.unet_inputs(2)
    with torch.no_grad():
        plain = tm.unet_call(unet, x, t, ctx)
    handle = ssr.SubjectAttention.attach(unet, weights.attention, 0.5)
    handle.set_context(_tokens())
    handle.set_rows([SUBJECT, None])
    with torch.no_grad():
        assert torch.equal(tm.unet_call(unet, x, t, ctx), plain)
        name, layer = handle.layers[3]
        q = torch.randn(2, 10, layer.to_q.out_features)
        added = handle.patched_branch(3, q, layer.heads)
        want = 0.5 * handle.subject_attention(3, layer, q)
    torch.testing.assert_close(added, want)
    assert torch.equal(added[1], torch.zeros_like(added[1]))
    assert handle.served[3] == 1
    handle.remove()
    assert handle.patched_branch(3, q, layer.heads) is None  # detached: nothing more


# ----------------------------------------------------------------------------- the session reports it

class _Runtime(rt.SSRRuntime):
    """The real runtime with the model checks and the encoding given (no CLIP files)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens

    def check_sd_model(self, sd_model, weights):
        return sd_model.model.diffusion_model

    def encode(self, embedder, subjects, sd_model, ssr_file, clip_file):
        return SimpleNamespace(tokens=self.tokens, value_weights=None)


class _P:
    def __init__(self):
        self.extra_generation_params = {infotext.ENABLED: True, infotext.SCALE: "0.7"}
        self.comments = []
        self.is_api = True

    def comment(self, text):
        self.comments.append(text)

    def close(self):
        pass


def _session(unet, weights, runtime, p):
    request = SimpleNamespace(subjects=[], scale=0.7, start=0.0, end=1.0)
    session = GenerationSession(runtime, p, request, None, None, SimpleNamespace(attention=weights.attention), None)
    p.ssr_encoder_session = session
    return session


def _one_step(session, unet, ctx):
    params = SimpleNamespace(denoiser=SimpleNamespace(step=0, total_steps=2), sampling_step=0, total_sampling_steps=2,
                             text_cond=ctx[:1], text_uncond=ctx[1:])
    session.on_step(params)
    x, t, _ = tm.unet_inputs(2)
    with torch.no_grad():
        tm.unet_call(unet, x, t, ctx)
    session.end_step()


def _one_batch(session, unet, runtime, p, restore):
    """A batch of one sampling step: prepare on the UNet, the step, after_batch; then restore()
    (the host's bypass of attn2) whatever happened."""
    _, _, ctx = tm.unet_inputs(2)
    try:
        session.prepare(SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)))
        _one_step(session, unet, ctx)
        runtime.after_batch(p)
    finally:
        restore()


def test_scale_0_arms_nothing(unet, weights):
    """Scale 0 (or no tokens): the branch is not armed, so nothing served is no problem."""
    runtime, p = _Runtime(_tokens()), _P()
    session = _session(unet, weights, runtime, p)
    session.request.scale = 0.0
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    _, _, ctx = tm.unet_inputs(2)
    session.prepare(sd_model)
    _one_step(session, unet, ctx)
    assert session.calls_armed == 0
    runtime.after_batch(p)
    assert infotext.ERROR not in p.extra_generation_params and not p.comments


@pytest.mark.parametrize("bypass", [False, True])
def test_armed_but_not_served_is_reported_not_applied(unet, weights, bypass):
    runtime, p = _Runtime(_tokens()), _P()
    session = _session(unet, weights, runtime, p)
    _one_batch(session, unet, runtime, p, restore=_bypass_attn2(unet) if bypass else (lambda: None))
    assert ssr.installed_subject_attention(unet) is None
    if not bypass:
        assert infotext.ERROR not in p.extra_generation_params and not p.comments
        assert p.extra_generation_params[infotext.ENABLED] is True
        return
    error = p.extra_generation_params[infotext.ERROR]
    assert "no cross-attention layer ran it" in error and "attention module's forward" in error, error
    assert infotext.ENABLED not in p.extra_generation_params  # never "SSR-Encoder: True"
    assert p.comments and p.comments[0].startswith("SSR-Encoder was not applied:")


def test_some_layers_bypassed_is_reported_partly_applied(unet, weights):
    runtime, p = _Runtime(_tokens()), _P()
    session = _session(unet, weights, runtime, p)
    middle = unet.middle_block[1].transformer_blocks[0]
    restore = _bypass_attn2(unet)
    for module in unet.modules():  # only the middle block bypasses
        if module is not middle and hasattr(module, "_forward") and "_forward" in vars(module):
            del module._forward
    _one_batch(session, unet, runtime, p, restore)
    error = p.extra_generation_params[infotext.ERROR]
    assert "only 15 of 16" in error and "middle_block.1" in error, error
    assert p.comments[0].startswith("SSR-Encoder was only partly applied:")
    assert p.extra_generation_params[infotext.ENABLED] is True  # partly applied: settings stay


def test_host_marks_route_rows_in_the_unet_call(unet, weights):
    """A UNet call that carries the host's cond_or_uncond (reForge's / Forge's UNet kwargs):
    rows follow the marks, uncond first, even when cond and uncond texts are identical."""
    runtime, p = _Runtime(_tokens()), _P()
    session = _session(unet, weights, runtime, p)
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    session.prepare(sd_model)
    seen = []
    session.handle.set_rows = lambda rows: seen.append(rows if callable(rows) else list(rows))
    same = torch.randn(1, 77, tm.TINY_CONTEXT_DIM)
    params = SimpleNamespace(denoiser=SimpleNamespace(step=0, total_steps=2), sampling_step=0, total_sampling_steps=2,
                             text_cond=same, text_uncond=same)
    session.on_step(params)
    x, t, _ = tm.unet_inputs(2)
    session._route(unet, (x, t), {"context": torch.cat([same, same]),
                                  "transformer_options": {"cond_or_uncond": [1, 0]}})
    assert seen[-1] == [UNCONDITIONAL, SUBJECT]
    session.close()


def test_patcher_keys_of_every_sd1_attn2_layer(unet):
    """Each attn2 layer's key as Forge's / reForge's patcher names it: (block, number, index)."""
    from ssr.layers import find_cross_attention_layers
    from ssr_webui.patcher import layer_key

    keys = [layer_key(name) for name, _ in find_cross_attention_layers(unet)]
    assert keys == ([("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("output", i, 0) for i in range(3, 12)]
                    + [("middle", 0, 0)])


def test_unet_called_around_our_pre_hook_is_reported_not_applied(unet, weights):
    """The branch is on for a step, but the UNet runs without its module call (its
    ``forward`` called directly, as a host or extension wrapping it might): our pre-hook
    never routes a row, so no row gets the branch (not even the default single context, which
    would reach the uncond row too), and the batch is reported not applied."""
    runtime, p = _Runtime(_tokens()[:1]), _P()
    session = _session(unet, weights, runtime, p)
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    x, t, ctx = tm.unet_inputs(2)
    with torch.no_grad():
        plain = tm.unet_call(unet, x, t, ctx)
    session.prepare(sd_model)
    params = SimpleNamespace(denoiser=SimpleNamespace(step=0, total_steps=2), sampling_step=0, total_sampling_steps=2,
                             text_cond=ctx[:1], text_uncond=ctx[1:])
    session.on_step(params)
    with torch.no_grad():
        around = unet.forward(x, t, context=ctx)
    session.end_step()
    assert session.handle.served == [0] * 16
    assert torch.equal(around, plain)
    runtime.after_batch(p)
    error = p.extra_generation_params[infotext.ERROR]
    assert "on for 1 sampling steps" in error and "never called" in error, error
    assert infotext.ENABLED not in p.extra_generation_params
    assert p.comments and p.comments[0].startswith("SSR-Encoder was not applied:")
    assert ssr.installed_subject_attention(unet) is None
