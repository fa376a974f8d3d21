"""The subject cross-attention branch (ssr.attention) on a tiny real ldm UNetModel and a tiny
diffusers UNet2DConditionModel, both with the SD1 layout and all parameters randomised.

Reference (docs/method.md, section 6): a deep copy of the UNet whose attn2 layers (found by the
names in docs/method.md, not by ssr.layers) get a per-instance forward computing
    to_out( softmax(Q K^T/sqrt(d)) V  +  scale * softmax(Q K_S^T/sqrt(d)) (w * V_S) )
with einsum, row by row. Tolerance: 2e-5 x max|output| (fp32, different summation order);
every test that compares against it also checks that the branch moves the output by far
more than that, so it cannot pass vacuously.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

import ldm.modules.attention as ldm_attention
from ssr.attention import IncompatibleUNetError, SubjectAttentionWeights, install_subject_attention, installed_subject_attention
from tests.core.sd1_layer_table import DIFFUSERS_NAMES, LDM_NAMES
from tests.tiny_models import SUBJECT_TOKENS, TINY_SD1_WIDTHS, ldm_unet_sd1, randomize_, unet_call, unet_inputs

REL_TOL = 2e-5


# ----------------------------------------------------------------------------- helpers

def attend(q, k, v, heads):
    """q [B, N, C], k/v [B, M, C] -> softmax(q k^T / sqrt(d)) v per head, [B, N, C]."""
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    weights = torch.einsum("bnhd,bmhd->bhnm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
    return torch.einsum("bhnm,bmhd->bnhd", weights, v).flatten(2)


def layer_names(unet):
    return LDM_NAMES if hasattr(unet, "input_blocks") else DIFFUSERS_NAMES


def eq4_reference(unet, weights, tokens, rows, scale, value_weights=None):
    """A copy of ``unet`` computing Eq. 4 directly in every attn2 layer."""
    ref = copy.deepcopy(unet)
    tokens = tokens if tokens.ndim == 3 else tokens[None]
    vw = torch.ones(tokens.shape[:2]) if value_weights is None else value_weights.expand(tokens.shape[:2])
    for j, name in enumerate(layer_names(unet)):
        layer = ref.get_submodule(name)
        wk, wv = weights[j].to_k.weight, weights[j].to_v.weight

        def forward(self, x, context=None, mask=None, encoder_hidden_states=None, attention_mask=None, _wk=wk, _wv=wv, **kw):
            ctx = context if context is not None else encoder_hidden_states
            q = self.to_q(x)
            out = attend(q, self.to_k(ctx), self.to_v(ctx), self.heads)
            extra = torch.zeros_like(out)
            for r, c in enumerate(rows):
                if c is not None:
                    ks = tokens[c] @ _wk.T
                    vs = (tokens[c] @ _wv.T) * vw[c][:, None]
                    extra[r] = attend(q[r:r + 1], ks[None].to(q.dtype), vs[None].to(q.dtype), self.heads)[0]
            return self.to_out[1](self.to_out[0](out + scale * extra))

        layer.forward = types.MethodType(forward, layer)
    return ref


def run(unet, x, t, ctx):
    with torch.no_grad():
        return unet_call(unet, x, t, ctx)


def assert_close_to(out, ref, plain=None):
    tol = REL_TOL * ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"
    if plain is not None:
        effect = (ref - plain).abs().max().item()
        assert effect > 1000 * tol, f"branch effect {effect:.3g} too small for a meaningful comparison"


def subject_tokens(contexts=2, dim=32, seed=7):
    return torch.randn(contexts, SUBJECT_TOKENS, dim, generator=torch.Generator().manual_seed(seed))


def hook_counts(module):
    """Forward (pre-)hooks on all submodules; the with_kwargs / always_called flag dicts must
    be empty whenever there are none."""
    count = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    if count == 0:
        assert not any(m._forward_hooks_with_kwargs or m._forward_pre_hooks_with_kwargs
                       or m._forward_hooks_always_called for m in module.modules())
    return count


def webui_sdpa_forward(self, x, context=None, mask=None, **kwargs):
    """An SDPA cross-attention forward like the WebUI's optimisation, installed at class level."""
    batch, _, _ = x.shape
    heads = self.heads
    q_in = self.to_q(x)
    context = x if context is None else context
    k_in, v_in = self.to_k(context), self.to_v(context)
    q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q_in, k_in, v_in))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, q_in.shape[-1]).to(q_in.dtype)
    out = self.to_out[0](out)
    return self.to_out[1](out)


def functional_forward(self, x, context=None, mask=None, **kwargs):
    """A forward that reads the weights but never calls to_q / to_out modules (like some
    third-party attention replacements): only the output-side fallback can see it."""
    context = x if context is None else context
    q = F.linear(x, self.to_q.weight)
    out = attend(q, F.linear(context, self.to_k.weight), F.linear(context, self.to_v.weight), self.heads)
    return F.linear(out, self.to_out[0].weight, self.to_out[0].bias)


class FunctionalDiffusersProcessor:
    """The same for diffusers: an attention processor that uses the weights directly."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = F.linear(hidden_states, attn.to_q.weight)
        out = attend(q, F.linear(ctx, attn.to_k.weight), F.linear(ctx, attn.to_v.weight), attn.heads)
        return F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)


@pytest.fixture(scope="module")
def weights():
    return randomize_(SubjectAttentionWeights(TINY_SD1_WIDTHS, 32), seed=3)


# ----------------------------------------------------------------------------- no-op cases

def test_disabled_branch_is_the_untouched_unet(unet, weights):
    x, t, ctx = unet_inputs(2)
    plain = run(unet, x, t, ctx)
    handle = install_subject_attention(unet, weights, scale=0.0)
    assert torch.equal(run(unet, x, t, ctx), plain)  # no context set yet
    handle.set_context(subject_tokens())
    handle.set_rows([0, 1])
    assert torch.equal(run(unet, x, t, ctx), plain)  # scale 0
    handle.scale = 0.8
    handle.enabled = False
    assert torch.equal(run(unet, x, t, ctx), plain)
    handle.enabled = True
    handle.set_rows([None, None])
    assert torch.equal(run(unet, x, t, ctx), plain)
    handle.set_rows([0, None])
    changed = run(unet, x, t, ctx)
    assert not torch.equal(changed[0], plain[0]) and torch.equal(changed[1], plain[1])
    assert handle.fallback_calls == 0


# ----------------------------------------------------------------------------- Eq. 4

def test_matches_eq4_reference(unet, weights):
    x, t, ctx = unet_inputs(2)
    tokens = subject_tokens()
    value_weights = torch.cat([torch.full((SUBJECT_TOKENS // 2,), 1.5), torch.full((SUBJECT_TOKENS - SUBJECT_TOKENS // 2,), 0.5)])
    plain = run(unet, x, t, ctx)
    reference = run(eq4_reference(unet, weights, tokens, [0, 1], 0.7, value_weights), x, t, ctx)
    handle = install_subject_attention(unet, weights, scale=0.7)
    handle.set_context(tokens, value_weights)
    handle.set_rows([0, 1])
    out = run(unet, x, t, ctx)
    assert_close_to(out, reference, plain)
    assert handle.fallback_calls == 0  # the default attention calls to_q and to_out[0]


def test_rows_in_any_order_match_rows_run_alone(unet, weights):
    x, t, ctx = unet_inputs(4, seed=2)
    tokens = subject_tokens()
    rows = [1, None, 0, 0]
    plain = run(unet, x, t, ctx)
    reference = run(eq4_reference(unet, weights, tokens, rows, 1.0), x, t, ctx)
    handle = install_subject_attention(unet, weights, scale=1.0)
    handle.set_context(tokens)
    handle.set_rows(rows)
    together = run(unet, x, t, ctx)
    assert_close_to(together, reference, plain)
    for r, c in enumerate(rows):
        handle.set_rows([c])
        alone = run(unet, x[r:r + 1], t[r:r + 1], ctx[r:r + 1])
        assert_close_to(together[r:r + 1], alone)
    assert torch.equal(together[1], plain[1])  # None row: untouched
    handle.set_rows(lambda batch: [0] * batch)  # rows may be computed per call
    assert_close_to(run(unet, x[2:], t[2:], ctx[2:]), together[2:])


def test_default_rows(unet, weights):
    """rows=None: one context serves every row; S contexts serve S rows in order."""
    x, t, ctx = unet_inputs(2, seed=3)
    tokens = subject_tokens()
    handle = install_subject_attention(unet, weights)
    handle.set_context(tokens[:1])
    one = run(unet, x, t, ctx)
    handle.set_rows([0, 0])
    assert torch.equal(one, run(unet, x, t, ctx))
    handle.set_context(tokens)
    handle.set_rows(None)
    both = run(unet, x, t, ctx)
    handle.set_rows([0, 1])
    assert torch.equal(both, run(unet, x, t, ctx))
    handle.set_context(torch.cat([tokens, tokens[:1]]))  # 3 contexts for 2 rows: ambiguous
    handle.set_rows(None)
    with pytest.raises(RuntimeError, match="3 contexts for a batch of 2 rows"):
        run(unet, x, t, ctx)


def test_row_errors_are_clear(ldm_unet, weights):
    x, t, ctx = unet_inputs(2)
    handle = install_subject_attention(ldm_unet, weights)
    handle.set_context(subject_tokens())
    handle.set_rows([0, 1, 1])
    with pytest.raises(RuntimeError, match="called with 2 rows, but rows for 3 were set"):
        run(ldm_unet, x, t, ctx)
    handle.set_rows([0, 2])
    with pytest.raises(RuntimeError, match=r"context index 2, but set_context was given 2 \(indices 0..1\)"):
        run(ldm_unet, x, t, ctx)
    handle.set_context(subject_tokens(contexts=1))
    handle.set_rows([0, 1])  # index 1 with a single context must not silently use context 0
    with pytest.raises(RuntimeError, match=r"context index 1, but set_context was given 1 \(indices 0..0\)"):
        run(ldm_unet, x, t, ctx)
    with pytest.raises(ValueError, match=r"\[S, M, 32\]"):
        handle.set_context(torch.zeros(2, 10, 31))
    with pytest.raises(ValueError, match="value_weights must have 462 entries"):
        handle.set_context(subject_tokens(), torch.ones(10))


def test_ldm_blocks_with_checkpoint_flag(ldm_unet, weights):
    """SD1 configs set use_checkpoint: the blocks then run inside ldm's CheckpointFunction."""
    x, t, ctx = unet_inputs(2, seed=14)
    tokens = subject_tokens()
    plain = run(ldm_unet, x, t, ctx)
    reference = run(eq4_reference(ldm_unet, weights, tokens, [0, 1], 1.0), x, t, ctx)
    blocks = [m for m in ldm_unet.modules() if isinstance(m, ldm_attention.BasicTransformerBlock)]
    assert len(blocks) == 16
    for block in blocks:
        block.checkpoint = True
    handle = install_subject_attention(ldm_unet, weights)
    handle.set_context(tokens)
    handle.set_rows([0, 1])
    assert_close_to(run(ldm_unet, x, t, ctx), reference, plain)


# ----------------------------------------------------------------------------- replaced forwards

def _branch_under_replaced_attention(unet, weights, replace, *, seed, rows, scale, fallback_calls):
    """The subject branch against Eq. 4 (a reference copy with per-instance forwards, made
    before ``replace()``) once ``replace()`` has swapped in a host's own attention, checked
    first to be a faithful attention; ``fallback_calls`` layers take the fallback path.
    -> (handle, plain output under the replaced attention, (x, t, ctx))."""
    x, t, ctx = unet_inputs(2, seed=seed)
    tokens = subject_tokens()
    original_plain = run(unet, x, t, ctx)
    reference = run(eq4_reference(unet, weights, tokens, rows, scale), x, t, ctx)
    replace()
    plain = run(unet, x, t, ctx)
    assert_close_to(plain, original_plain)  # the replacement itself is a faithful attention
    handle = install_subject_attention(unet, weights, scale=scale)
    handle.set_context(tokens)
    handle.set_rows(rows)
    assert_close_to(run(unet, x, t, ctx), reference, plain)
    assert handle.fallback_calls == fallback_calls
    return handle, plain, (x, t, ctx)


def test_class_level_sdpa_forward(ldm_unet, weights, monkeypatch):
    """The WebUI replaces CrossAttention.forward on the class; the hooks still see to_q/to_out."""
    assert type(ldm_unet.get_submodule(LDM_NAMES[0])) is ldm_attention.CrossAttention

    def replace():
        monkeypatch.setattr(ldm_attention.CrossAttention, "forward", webui_sdpa_forward)

    handle, plain, inputs = _branch_under_replaced_attention(ldm_unet, weights, replace, seed=4, rows=[0, 1], scale=0.6,
                                                             fallback_calls=0)
    handle.remove()
    assert torch.equal(run(ldm_unet, *inputs), plain)


def test_instance_forward_without_module_calls_uses_fallback(ldm_unet, weights):
    def replace():
        for module in ldm_unet.modules():
            if isinstance(module, ldm_attention.CrossAttention):
                module.forward = types.MethodType(functional_forward, module)

    handle, plain, inputs = _branch_under_replaced_attention(ldm_unet, weights, replace, seed=5, rows=[1, 0], scale=0.9,
                                                             fallback_calls=16)
    handle.remove()
    assert torch.equal(run(ldm_unet, *inputs), plain)


def test_diffusers_processor_without_module_calls_uses_fallback(diffusers_unet_pristine, weights):
    unet = copy.deepcopy(diffusers_unet_pristine)
    _branch_under_replaced_attention(unet, weights, lambda: unet.set_attn_processor(FunctionalDiffusersProcessor()),
                                     seed=6, rows=[0, None], scale=1.0, fallback_calls=16)


# ----------------------------------------------------------------------------- install / remove

def test_removal_restores_exactly(unet, weights):
    x, t, ctx = unet_inputs(2, seed=7)
    plain = run(unet, x, t, ctx)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    forwards = {name: m.__dict__.get("forward") for name, m in unet.named_modules()}
    assert hook_counts(unet) == 0
    with install_subject_attention(unet, weights) as handle:
        assert installed_subject_attention(unet) is handle and handle.installed
        assert hook_counts(unet) >= 16
        handle.set_context(subject_tokens())
        handle.set_rows([0, 1])
        assert not torch.equal(run(unet, x, t, ctx), plain)
    assert not handle.installed and installed_subject_attention(unet) is None
    assert hook_counts(unet) == 0
    assert not hasattr(unet, "_ssr_subject_attention")
    assert {name: m.__dict__.get("forward") for name, m in unet.named_modules()} == forwards
    after = unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(run(unet, x, t, ctx), plain)
    handle.remove()  # again: harmless
    assert torch.equal(run(unet, x, t, ctx), plain)


def test_second_install_replaces_first(unet, weights):
    x, t, ctx = unet_inputs(2, seed=8)
    tokens = subject_tokens()
    plain = run(unet, x, t, ctx)
    reference = run(eq4_reference(unet, weights, tokens, [0, 1], 0.5), x, t, ctx)
    first = install_subject_attention(unet, weights, scale=0.5)
    first.set_context(tokens)
    first.set_rows([0, 1])
    hooks_of_one = hook_counts(unet)
    second = install_subject_attention(unet, weights, scale=0.5)
    assert not first.installed and second.installed and installed_subject_attention(unet) is second
    assert hook_counts(unet) == hooks_of_one  # replaced, not added
    second.set_context(tokens)
    second.set_rows([0, 1])
    once = run(unet, x, t, ctx)
    assert_close_to(once, reference, plain)  # the branch is applied once, not twice
    first.remove()  # removing a replaced handle does not touch the current one
    assert installed_subject_attention(unet) is second and torch.equal(run(unet, x, t, ctx), once)
    second.remove()
    second.remove()
    assert hook_counts(unet) == 0 and torch.equal(run(unet, x, t, ctx), plain)


def test_projected_kv_cached_per_context(unet, weights):
    x, t, ctx = unet_inputs(2, seed=9)
    handle = install_subject_attention(unet, weights)
    handle.set_context(subject_tokens())
    handle.set_rows([0, 1])
    uncached = run(unet, x, t, ctx)
    assert len(handle._kv) == 16  # one K/V pair per layer, for this dtype and device
    cached_kv = {k: v[0] for k, v in handle._kv.items()}
    cached = run(unet, x, t, ctx)
    assert torch.equal(cached, uncached)
    assert all(handle._kv[k][0] is v for k, v in cached_kv.items())  # not recomputed
    handle.set_context(subject_tokens())  # same tokens again: cache cleared and rebuilt
    assert not handle._kv
    assert torch.equal(run(unet, x, t, ctx), uncached)
    handle.set_context(subject_tokens(seed=99))  # new subject: new K/V
    assert not torch.equal(run(unet, x, t, ctx), uncached)


# ----------------------------------------------------------------------------- subject weights

def test_value_weight_semantics(ldm_unet, weights):
    """Branch = sum over subjects of (their attention share) x weight x values: linear in the
    value weights, so value weight 2 doubles that subject's contribution and 0 zeroes it (its
    tokens keep their softmax share here; the embedder leaves a weight-0 subject's tokens out
    altogether, see test_subject_embedder.py::test_weight_zero_removes_the_subject)."""
    two = torch.cat([subject_tokens(1, seed=1), subject_tokens(1, seed=2)], dim=1)  # [1, 924, 32]
    handle = install_subject_attention(ldm_unet, weights)
    index, (_, layer) = 3, handle.layers[3]
    query = torch.randn(2, 20, layer.to_q.out_features, generator=torch.Generator().manual_seed(0))
    handle.set_rows([0, 0])

    def branch(w_a, w_b):
        handle.set_context(two, torch.cat([torch.full((SUBJECT_TOKENS,), w_a), torch.full((SUBJECT_TOKENS,), w_b)]))
        with torch.no_grad():
            return handle.subject_attention(index, layer, query)

    only_a, only_b, both = branch(1.0, 0.0), branch(0.0, 1.0), branch(1.0, 1.0)
    assert only_a.abs().max() > 0.05 and only_b.abs().max() > 0.05
    assert torch.allclose(both, only_a + only_b, atol=1e-5)
    assert torch.allclose(branch(2.0, 1.0), 2 * only_a + only_b, atol=1e-5)
    assert torch.allclose(branch(2.0, 0.0), 2 * only_a, atol=1e-5)
    assert not branch(0.0, 0.0).any()
    handle.set_context(two)  # no weights == weight 1
    with torch.no_grad():
        assert torch.allclose(handle.subject_attention(index, layer, query), both, atol=1e-6)
    # all weights 0: no subject content reaches the UNet
    x, t, ctx = unet_inputs(2, seed=10)
    handle.remove()
    plain = run(ldm_unet, x, t, ctx)
    handle = install_subject_attention(ldm_unet, weights)
    handle.set_context(two, torch.zeros(2 * SUBJECT_TOKENS))
    handle.set_rows([0, 0])
    assert torch.equal(run(ldm_unet, x, t, ctx), plain)
    # per-context weights [S, M]: the unconditional context keeps weight 1
    tokens = subject_tokens()
    w = torch.stack([torch.full((SUBJECT_TOKENS,), 2.0), torch.ones(SUBJECT_TOKENS)])
    reference = run(eq4_reference(ldm_unet, weights, tokens, [0, 1], 1.0, w), x, t, ctx)
    handle.set_context(tokens, w)
    handle.set_rows([0, 1])
    assert_close_to(run(ldm_unet, x, t, ctx), reference, plain)


# ----------------------------------------------------------------------------- training

def test_gradients_match_reference_and_survive_checkpointing(diffusers_unet_pristine, weights):
    """Training: gradients reach K_S/V_S and the subject tokens (the aligner's output), equal
    the reference's, and gradient checkpointing (which re-runs each block in backward) gives
    the same gradients, so projected K/V must not be cached while autograd records."""
    x, t, ctx = unet_inputs(2, seed=13)
    tokens = subject_tokens()

    def grads(use_reference, checkpointing):
        unet = copy.deepcopy(diffusers_unet_pristine).requires_grad_(False)
        w = copy.deepcopy(weights).requires_grad_(True)
        tok = tokens.clone().requires_grad_(True)
        if use_reference:
            unet = eq4_reference(unet, w, tok, [0, 1], 1.0)
        else:
            handle = install_subject_attention(unet, w)
            handle.set_context(tok)
            handle.set_rows([0, 1])
        if checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        unet_call(unet, x, t, ctx).square().mean().backward()
        if not use_reference:
            assert not handle._kv
        return [w[2].to_k.weight.grad, w[2].to_v.weight.grad, w[15].to_v.weight.grad, tok.grad]

    reference, ours, checkpointed = grads(True, False), grads(False, False), grads(False, True)
    for r, o, c in zip(reference, ours, checkpointed):
        assert r.abs().max() > 0
        assert torch.allclose(o, r, rtol=0, atol=1e-4 * r.abs().max()), (o - r).abs().max()
        assert torch.allclose(c, o, rtol=0, atol=1e-5 * o.abs().max()), (c - o).abs().max()


# ----------------------------------------------------------------------------- precision

def test_bf16_autocast_ldm_close_to_fp32(ldm_unet, weights):
    """WebUI-style: fp32 weights under autocast (bf16 on CPU; fp16 on CUDA)."""
    x, t, ctx = unet_inputs(2, seed=11)
    tokens = subject_tokens()
    plain = run(ldm_unet, x, t, ctx)
    handle = install_subject_attention(ldm_unet, weights)
    handle.set_context(tokens)
    handle.set_rows([0, 1])
    full = run(ldm_unet, x, t, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(ldm_unet, x, t, ctx)
    assert any(key[1] == torch.bfloat16 for key in handle._kv)  # K/V cached per dtype
    err, effect = (low.float() - full).abs().max(), (full - plain).abs().max()
    assert err < 0.05 * full.abs().max() and err < 0.25 * effect, (err, effect)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_diffusers_close_to_fp32(diffusers_unet_pristine, weights, dtype):
    unet = copy.deepcopy(diffusers_unet_pristine)
    x, t, ctx = unet_inputs(2, seed=12)
    tokens = subject_tokens()
    plain = run(unet, x, t, ctx)
    handle = install_subject_attention(unet, weights)  # SSR weights stay fp32
    handle.set_context(tokens)
    handle.set_rows([0, 1])
    full = run(unet, x, t, ctx)
    unet.to(dtype)
    low = run(unet, x.to(dtype), t, ctx.to(dtype))
    assert low.dtype == dtype
    err, effect = (low.float() - full).abs().max(), (full - plain).abs().max()
    assert err < 0.05 * full.abs().max() and err < 0.25 * effect, (err, effect)


# ----------------------------------------------------------------------------- compatibility

@pytest.mark.parametrize("context_dim, family", [(1024, "SD2.x"), (2048, "SDXL")])
def test_other_family_unet_is_refused(weights, context_dim, family):
    unet = ldm_unet_sd1(context_dim=context_dim, randomize=False)
    with pytest.raises(IncompatibleUNetError, match=f"{context_dim}-dim \\({family}\\).*32-dim"):
        install_subject_attention(unet, weights)
    assert hook_counts(unet) == 0 and installed_subject_attention(unet) is None


def test_wrong_layer_count_or_width_is_refused(ldm_unet, weights):
    fewer = ldm_unet_sd1(attention_resolutions=(4, 2), randomize=False)  # no attention at full resolution: 11 layers
    with pytest.raises(IncompatibleUNetError, match="has 11 cross-attention layers, the SSR weights have 16"):
        install_subject_attention(fewer, weights)
    assert hook_counts(fewer) == 0
    wider = ldm_unet_sd1(model_channels=64, randomize=False)
    with pytest.raises(IncompatibleUNetError, match="input_blocks.1.1.transformer_blocks.0.attn2 is 64 wide.*expect 32"):
        install_subject_attention(wider, SubjectAttentionWeights(TINY_SD1_WIDTHS, 32))
    assert hook_counts(wider) == 0
    # a failed install leaves an existing installation alone
    handle = install_subject_attention(ldm_unet, weights)
    hooks = hook_counts(ldm_unet)
    with pytest.raises(IncompatibleUNetError):
        install_subject_attention(ldm_unet, SubjectAttentionWeights(TINY_SD1_WIDTHS[::-1], 32))
    assert handle.installed and installed_subject_attention(ldm_unet) is handle and hook_counts(ldm_unet) == hooks


def test_model_without_cross_attention_is_refused(weights):
    with pytest.raises(IncompatibleUNetError, match="no cross-attention"):
        install_subject_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)), weights)
