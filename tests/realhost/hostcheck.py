"""Check what the extension did inside a real generation, layer by layer, against a direct
computation.

``AttentionRecorder`` puts a forward hook on each of the UNet's 16 cross-attention layers
(``attn2``) and an ``on_cfg_denoiser`` callback in the WebUI. Per layer call it keeps the
layer's input, text context and output, tagged with the sampling step (counted from the
denoiser callbacks) and the step's cond / uncond text conditioning as the WebUI passed them.

``verify`` then recomputes, for every recorded call and every row:

* the layer without the extension: the same module called on the same input after the
  generation (the extension's hooks are gone by then; the WebUI's attention optimisation
  is still the one that ran), and
* the subject branch by hand: ``softmax(Q K_S^T / sqrt(d)) V_S`` per head with the K_S/V_S
  of the SSR weights file and the subject tokens of the core library's encoder, for the
  subject tokens (cond rows) or the unconditional subject tokens (uncond rows), mapped
  through ``to_out[0]``'s weight (the layer's output projection is linear, so
  ``to_out(a + l*b) = to_out(a) + l * W b``),

and asserts: rows inside the start/end window equal ``plain + scale * W branch`` (fp32,
tolerance stated in ``verify``); rows outside it equal the plain layer bit for bit. A row is
cond or uncond by matching its text context against the WebUI's own ``text_cond`` /
``text_uncond`` of that step, never by position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

# Official SSR index i (1, 3, ..., 31) -> ldm block of its attn2 (SpatialTransformer
# ``.transformer_blocks.0.attn2``), from the method's layer table; written here
# independently of ssr.layers so that a wrong mapping there fails these tests.
LDM_BLOCK_BY_OFFICIAL = {
    1: "input_blocks.1.1", 3: "input_blocks.2.1", 5: "input_blocks.4.1", 7: "input_blocks.5.1",
    9: "input_blocks.7.1", 11: "input_blocks.8.1", 13: "output_blocks.3.1", 15: "output_blocks.4.1",
    17: "output_blocks.5.1", 19: "output_blocks.6.1", 21: "output_blocks.7.1", 23: "output_blocks.8.1",
    25: "output_blocks.9.1", 27: "output_blocks.10.1", 29: "output_blocks.11.1", 31: "middle_block.1",
}


def attn2_layers(unet):
    """[(official index, module)] for the 16 attn2 layers of an ldm SD1 UNet."""
    modules = dict(unet.named_modules())
    return [(i, modules[block + ".transformer_blocks.0.attn2"]) for i, block in sorted(LDM_BLOCK_BY_OFFICIAL.items())]


@dataclass
class LayerCall:
    official: int
    step: int
    x: torch.Tensor
    context: torch.Tensor
    out: torch.Tensor


@dataclass
class StepConds:
    cond: List[torch.Tensor] = field(default_factory=list)
    uncond: List[torch.Tensor] = field(default_factory=list)


def _rows(t) -> List[torch.Tensor]:
    if isinstance(t, dict):  # SDXL-style dict conds do not occur with SD1; keep crossattn
        t = t["crossattn"]
    return [r.detach().float().cpu().clone() for r in t]


class AttentionRecorder:
    def __init__(self, unet):
        self.unet = unet
        self.calls: List[LayerCall] = []
        self.steps: List[StepConds] = []
        self._handles = []
        self._callback = None

    def __enter__(self):
        from modules import script_callbacks

        def on_denoiser(params):
            self.steps.append(StepConds(_rows(params.text_cond), _rows(params.text_uncond)))

        self._callback = on_denoiser
        script_callbacks.on_cfg_denoiser(on_denoiser)
        for official, layer in attn2_layers(self.unet):
            self._handles.append(layer.register_forward_hook(self._hook(official), with_kwargs=True))
        return self

    def _hook(self, official):
        def hook(module, args, kwargs, output):
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            self.calls.append(LayerCall(official, len(self.steps) - 1, args[0].detach().float().cpu().clone(),
                                        context.detach().float().cpu().clone(), output.detach().float().cpu().clone()))
        return hook

    def __exit__(self, *exc):
        from modules import script_callbacks

        for h in self._handles:
            h.remove()
        self._handles.clear()
        script_callbacks.remove_callbacks_for_function(self._callback)


CONTROLNET_MARK = 1024.0  # sd-webui-controlnet's marker token value (+ cond, - uncond)


def _as_layer_sees(r: torch.Tensor, context_row: torch.Tensor) -> torch.Tensor:
    """A step's cond/uncond row as the layers see it: while a ControlNet unit is active, the
    conds the denoiser reports carry one leading marker token (every value +-1024) that
    ControlNet's UNet forward strips before the blocks run."""
    if r.shape[0] == context_row.shape[0] + 1 and bool(((r[0].abs() - CONTROLNET_MARK).abs() < 1e-3).all()):
        return r[1:]
    return r


def classify(context_row: torch.Tensor, conds: StepConds) -> str:
    for kind, rows in (("uncond", conds.uncond), ("cond", conds.cond)):
        for r in rows:
            r = _as_layer_sees(r, context_row)
            if r.shape == context_row.shape and torch.equal(r, context_row):
                return kind
    raise AssertionError("a layer saw a text context that is neither the step's cond nor its uncond")


def branch(layer, x: torch.Tensor, kv, tokens: torch.Tensor, value_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Attn(Q, K_S, V_S) for one row by hand: x [N, C], tokens [T, D] -> [N, C]."""
    with torch.no_grad():
        q = layer.to_q(x.to(layer.to_q.weight.dtype)).float()
        k = tokens.float() @ kv.to_k.weight.float().t()
        v = tokens.float() @ kv.to_v.weight.float().t()
        if value_weights is not None:
            v = v * value_weights.float()[:, None]
        h = layer.heads
        d = q.shape[-1] // h
        qh, kh, vh = (t.reshape(t.shape[0], h, d).transpose(0, 1) for t in (q, k, v))
        att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        return (att @ vh).transpose(0, 1).reshape(x.shape[0], h * d)


@dataclass
class Expectation:
    tokens: Optional[torch.Tensor]          # [2, T, D]: row 0 subjects, row 1 unconditional; None = no SSR
    value_weights: Optional[torch.Tensor]   # [T] or None
    weights: object = None                  # ssr SSRWeights (K_S/V_S per canonical position)
    scale: float = 1.0
    active_steps: Optional[set] = None      # steps where the branch must act; None = all


def verify(recorder: AttentionRecorder, unet, expect: Expectation, rtol: float = 1e-4, atol: float = 1e-5) -> dict:
    """Assert every recorded row against the direct computation; returns counts per kind.

    Tolerance: the subject rows compare fp32 against fp32 with rtol 1e-4 / atol 1e-5 on values
    of order 1 (different summation order than the WebUI's attention kernels); rows without
    the branch must be bit-identical to the plain layer on the same batch."""
    layers = dict(attn2_layers(unet))
    counts = {"subject": 0, "unconditional-subject": 0, "plain": 0}
    assert recorder.calls, "no cross-attention call was recorded"
    for call in recorder.calls:
        layer = layers[call.official]
        dtype = layer.to_q.weight.dtype
        with torch.no_grad():
            plain = layer(call.x.to(dtype), context=call.context.to(dtype)).float()
        conds = recorder.steps[call.step]
        active = expect.tokens is not None and (expect.active_steps is None or call.step in expect.active_steps)
        for row in range(call.x.shape[0]):
            kind = classify(call.context[row], conds)
            if not active:
                assert torch.equal(call.out[row], plain[row]), \
                    f"layer {call.official} step {call.step} row {row} ({kind}): changed where SSR must not act"
                counts["plain"] += 1
                continue
            position = (call.official - 1) // 2
            kv = expect.weights.attention[position]
            ctx = 0 if kind == "cond" else 1
            b = branch(layer, call.x[row], kv, expect.tokens[ctx], expect.value_weights)
            want = plain[row] + expect.scale * (b @ layer.to_out[0].weight.float().t())
            torch.testing.assert_close(call.out[row], want, rtol=rtol, atol=atol,
                                       msg=lambda m: f"layer {call.official} step {call.step} row {row} ({kind}): {m}")
            counts["subject" if kind == "cond" else "unconditional-subject"] += 1
    return counts


def subject_reference(host, weights_file: str, clip_dir: str, subjects):
    """The core library's encoding of ``subjects`` (ssr.Subject list) with the files the
    generation used and the loaded model's own text encoder -> (weights, EncodedSubjects)."""
    import ssr
    from ssr.query_encoder import encode_query_tokens, hf_query_tokens

    weights = ssr.load_ssr_weights(weights_file)
    clip = ssr.load_clip_image_encoder(clip_dir, expect_width=weights.encoder.config.image_dim)
    wrapped = host.shared.sd_model.cond_stage_model.wrapped

    def encode_text(texts):
        with torch.no_grad():
            return encode_query_tokens(wrapped.transformer, hf_query_tokens(wrapped.tokenizer, texts))

    with torch.no_grad():
        encoded = ssr.SubjectEmbedder(clip, weights, encode_text).encode(subjects)
    return weights, encoded
