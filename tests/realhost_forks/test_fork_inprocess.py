"""SSR-Encoder inside a real fork (reForge or Forge: ``SSR_FORK``), in-process, through the
fork's own HTTP API, script runner, UNet patcher and sampler, with a random SD1.5-sized model.

Checked:
* plain vs SSR vs scale 0: SSR changes the image, scale 0 is plain bit for bit; nothing of
  ours is left on the UNet or the model's patcher afterwards;
* the same numbers: every UNet call of a generation with SSR (prompt = negative prompt, two
  subjects) equals, within 1e-5 relative in fp32, the same UNet called with reference attn2
  patches written here: attention by einsum plus ``scale * softmax(Q K_S^T / sqrt(d)) V_S``
  from the SSR weights file and the core library's subject tokens, each row's context
  (subject or unconditional) taken from the host's ``cond_or_uncond``;
* with an attn2 replace patch already on every key (what the built-in IP-Adapter installs),
  ours chains to it: the reference calls the same patch;
* cond and uncond in separate UNet calls (the host's low-memory path, forced) give the same
  numbers; a skipped uncond (CFG scale 1) is served;
* a partial start/end window follows the host's sigmas (calls outside it are plain), and a
  window no call falls in is reported not applied;
* the fork's built-in IP-Adapter (a ControlNet unit) and its built-in ControlNet, each with
  SSR in one generation;
* never silently not applied: forcing each bypass reports "not applied" with the reason
  (module hooks beside a replace patch, the host's path that calls to_q/to_out directly;
  the attn2 patches dropped from the UNet call).
"""
from __future__ import annotations

import base64
import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLIP, FORK, MODELS, SSR_MODEL

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "realhost"))
import hostcheck  # noqa: E402
import payloads as pl  # noqa: E402

TOL = 1e-5


def _unit(*subjects, scale=0.65, **kw):
    return pl.ssr_unit(*subjects, scale=scale, model=SSR_MODEL, clip_model=CLIP, **kw)


def _subjects(n=2):
    out = []
    for i in range(n):
        image = pl.reference_image(i)
        out.append((image, ("the red thing", "the blue thing")[i % 2]))
    return out


def _payload_subjects(subjects):
    return [{"image": pl.encode(im), "query": q, "weight": 1.0} for im, q in subjects]


def _image(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB")).astype(np.int16)


def _text_model(fork):
    """The fork's SD1 CLIP text model and tokenizer, where the fork keeps them."""
    sd_model = fork.sd_model
    wrapped = getattr(getattr(sd_model, "cond_stage_model", None), "wrapped", None)
    if FORK == "reforge" and wrapped is not None:
        return wrapped.transformer, wrapped.tokenizer
    clip = sd_model.forge_objects.clip
    return clip.cond_stage_model.clip_l.transformer, clip.tokenizer.clip_l


def _reference_tokens(fork, subjects):
    import ssr
    from ssr.query_encoder import encode_query_tokens, hf_query_tokens

    weights = ssr.load_ssr_weights(os.path.join(MODELS, "ssr_encoder", SSR_MODEL))
    clip = ssr.load_clip_image_encoder(os.path.join(MODELS, CLIP), expect_width=weights.encoder.config.image_dim)
    transformer, tokenizer = _text_model(fork)

    def encode_text(texts):
        with torch.no_grad():
            device = next(transformer.parameters()).device
            return encode_query_tokens(transformer, hf_query_tokens(tokenizer, texts), device)

    with torch.no_grad():
        encoded = ssr.SubjectEmbedder(clip, weights, encode_text).encode(
            [ssr.Subject(image=im, query=q) for im, q in subjects])
    return weights, encoded


# Key of each attn2 layer in the patcher's naming, from hostcheck's independent table.
def _keys():
    keys = {}
    for official, block in hostcheck.LDM_BLOCK_BY_OFFICIAL.items():
        kind, number = block.split(".")[0], int(block.split(".")[1])
        name = {"input_blocks": "input", "output_blocks": "output", "middle_block": "middle"}[kind]
        keys[(name, 0 if name == "middle" else number)] = (official - 1) // 2
    return keys


def attend(q, k, v, heads):
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    w = torch.einsum("bnhd,bmhd->bhnm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
    return torch.einsum("bhnm,bmhd->bnhd", w, v).flatten(2)


class ReferencePatch:
    def __init__(self, position, weights, encoded, scale, previous=None):
        kv = weights.attention[position]
        tokens = encoded.tokens.float()
        vw = encoded.value_weights
        self.ks = tokens @ kv.to_k.weight.float().t()
        self.vs = tokens @ kv.to_v.weight.float().t()
        if vw is not None:
            self.vs = self.vs * (vw.float()[None, :, None] if vw.ndim == 1 else vw.float()[:, :, None])
        self.scale, self.previous = scale, previous

    def __call__(self, q, k, v, extra):
        heads = extra["n_heads"]
        out = self.previous(q, k, v, extra) if self.previous is not None else attend(q, k, v, heads)
        marks = extra["cond_or_uncond"]
        per = q.shape[0] // len(marks)
        extra_rows = torch.zeros_like(out)
        for c, mark in enumerate(marks):
            ctx = 0 if mark == 0 else 1
            for r in range(c * per, (c + 1) * per):
                extra_rows[r] = attend(q[r:r + 1], self.ks[ctx][None], self.vs[ctx][None], heads)[0]
        return out + self.scale * extra_rows


def _control_copy(control):
    """A ControlNet residual dict {"input"|"middle"|"output": [tensor, ...]} with its own lists
    (the UNet pops the residuals off them as it uses them)."""
    return {name: list(residuals) for name, residuals in control.items()} if isinstance(control, dict) else control


class UNetRecorder:
    """Forward hook on the UNet: every call's inputs (after the pre-hooks) and output; the
    ControlNet residuals as they were before the call."""

    def __init__(self, unet, limit=2):
        self.unet, self.calls, self.limit = unet, [], limit
        self._control = None

    def __enter__(self):
        def before(module, args, kwargs):
            self._control = _control_copy(kwargs.get("control"))

        def hook(module, args, kwargs, output):
            if len(self.calls) < self.limit:
                opts = dict(kwargs.get("transformer_options", {}))
                kept = {k: v for k, v in kwargs.items() if k != "transformer_options"}
                if "control" in kept:
                    kept["control"] = self._control
                self.calls.append((tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                                   kept, opts, output.detach().clone()))
        self.handles = [self.unet.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                        self.unet.register_forward_hook(hook, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _leftovers(fork):
    """Anything of ours still on the UNet, its layers or the model's patchers."""
    unet = fork.unet
    found = []
    if getattr(unet, "_ssr_subject_attention", None) is not None or getattr(unet, "_ssr_webui_route_hook", None):
        found.append("UNet attributes")
    hooks = [h for m in unet.modules() for h in list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values())]
    if any("ssr" in getattr(h, "__module__", "") or "session" in getattr(getattr(h, "__func__", h), "__qualname__", "")
           for h in hooks):
        found.append("hooks")
    for objects in (fork.sd_model.forge_objects, fork.sd_model.forge_objects_after_applying_lora):
        attn2 = objects.unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        if any(type(p).__name__ == "AttentionPatch" for p in attn2.values()):
            found.append("patches")
    return found


@pytest.fixture
def foreign_patch(fork):
    """An attn2 replace patch on every key of the model's patcher before any script runs (as
    the built-in IP-Adapter leaves one): plain attention with its output scaled by 1.1."""
    objects = fork.sd_model.forge_objects_after_applying_lora
    original = objects.unet
    clone = original.clone()

    def patch(q, k, v, extra):
        return 1.1 * attend(q, k, v, extra["n_heads"])

    for (name, number) in _keys():
        clone.set_model_attn2_replace(patch, name, number)
    objects.unet = clone
    yield patch
    objects.unet = original


def test_plain_ssr_scale0_and_nothing_left(fork):
    subjects = _payload_subjects(_subjects(1))
    base = dict(prompt="a photo of a cat", negative_prompt="blurry")
    plain = fork.txt2img(**base)
    ssr_result = fork.txt2img(**base, alwayson_scripts=pl.alwayson(_unit(*subjects)))
    zero = fork.txt2img(**base, alwayson_scripts=pl.alwayson(_unit(*subjects, scale=0.0)))
    assert "SSR error" not in ssr_result["info"], ssr_result["info"]
    assert "SSR-Encoder: True" in ssr_result["info"]
    assert np.abs(_image(ssr_result) - _image(plain)).max() > 0
    assert np.array_equal(_image(zero), _image(plain))
    assert _leftovers(fork) == []


def _check_against_reference(fork, rec, subjects, scale, previous=None, window=None):
    """Every recorded UNet call's output against the same call with the reference patches
    (and the plain one, to see that the branch moved it). With ``window`` = (sigma at start,
    sigma at end), a call whose sigma is outside (end, start] must equal the plain one instead.
    -> the cond_or_uncond marks seen, or with ``window`` the set of (marks, in window)."""
    assert rec.calls
    weights, encoded = _reference_tokens(fork, subjects)
    patches = {key: ReferencePatch(pos, weights, encoded, scale, previous) for key, pos in _keys().items()}
    plain_patches = {key: (previous if previous is not None else (lambda q, k, v, e: attend(q, k, v, e["n_heads"])))
                     for key in _keys()}
    seen = set()
    for args, kwargs, opts, out in rec.calls:
        marks = tuple(opts["cond_or_uncond"])
        sigma = float(opts["sigmas"].max())
        on = window is None or window[1] < sigma <= window[0]
        seen.add((marks, on))
        assert out.dtype == torch.float32
        opts = {k: v for k, v in opts.items() if k != "patches_replace"}
        with torch.no_grad():
            want = fork.unet(*args, **dict(kwargs, control=_control_copy(kwargs.get("control"))),
                             transformer_options=dict(opts, patches_replace={"attn2": patches}))
            plain = fork.unet(*args, **dict(kwargs, control=_control_copy(kwargs.get("control"))),
                              transformer_options=dict(opts, patches_replace={"attn2": plain_patches}))
        target = want if on else plain
        err = (out.float() - target.float()).abs().max().item()
        size = target.float().abs().max().item()
        moved = (plain.float() - want.float()).abs().max().item()
        assert err <= TOL * size, f"sigma {sigma:.4g} ({'in' if on else 'outside'} the window): max error {err:.3g} vs {TOL} x {size:.3g}"
        assert moved > 100 * TOL * size, f"the branch moved the prediction by only {moved:.3g}"
    return seen if window is not None else {m for m, _ in seen}


@pytest.mark.parametrize("chained", [False, True], ids=["alone", "after-foreign-patch"])
def test_noise_prediction_equals_reference(fork, request, chained):
    """prompt = negative prompt, two subjects: rows only from the host's marks."""
    previous = request.getfixturevalue("foreign_patch") if chained else None
    subjects = _subjects(2)
    scale = 0.8
    unit = _unit(*_payload_subjects(subjects), scale=scale)
    with UNetRecorder(fork.unet) as rec:
        result = fork.txt2img(prompt="a cat on a sofa", negative_prompt="a cat on a sofa", steps=2,
                              alwayson_scripts=pl.alwayson(unit))
    assert "SSR error" not in result["info"], result["info"]
    marks_seen = _check_against_reference(fork, rec, subjects, scale, previous)
    assert any(1 in m and 0 in m for m in marks_seen) or len(marks_seen) > 1, marks_seen
    assert _leftovers(fork) == []


def test_cond_and_uncond_in_separate_calls(fork, monkeypatch):
    """When the host thinks memory is short it runs cond and uncond as separate UNet calls
    (one chunk each): each call's rows still come from its marks, with the same numbers."""
    monkeypatch.setattr(fork.sd_model.forge_objects.unet.model, "memory_required", lambda *a, **k: float("inf"))
    subjects = _subjects(1)
    with UNetRecorder(fork.unet, limit=2) as rec:
        result = fork.txt2img(prompt="a dog", negative_prompt="a dog", steps=2,
                              alwayson_scripts=pl.alwayson(_unit(*_payload_subjects(subjects), scale=0.8)))
    assert "SSR error" not in result["info"], result["info"]
    assert _check_against_reference(fork, rec, subjects, 0.8) == {(0,), (1,)}


def test_skipped_uncond_is_served(fork):
    """CFG scale 1: the forks skip the uncond rows; every call is cond only."""
    with UNetRecorder(fork.unet, limit=10) as rec:
        result = fork.txt2img(prompt="a cat", negative_prompt="blurry", cfg_scale=1.0, steps=2,
                              alwayson_scripts=pl.alwayson(_unit(*_payload_subjects(_subjects(1)))))
    assert "SSR error" not in result["info"], result["info"]
    assert {tuple(o["cond_or_uncond"]) for _, _, o, _ in rec.calls} == {(0,)}


def _percent_to_sigma(fork):
    """The host's own percent -> sigma of the loaded model (reForge: ``model_sampling``,
    Forge: ``predictor``)."""
    model = fork.sd_model.forge_objects.unet.model
    return (getattr(model, "model_sampling", None) or model.predictor).percent_to_sigma


def test_partial_window_follows_the_host_sigmas(fork):
    """start 0.3, end 0.8 over 5 steps: the calls whose sigma lies in (sigma(0.8), sigma(0.3)]
    (the host's ``percent_to_sigma``) carry the branch, checked against the reference; the
    others equal the plain UNet. Both kinds occur."""
    subjects, scale, start, end = _subjects(1), 0.8, 0.3, 0.8
    to_sigma = _percent_to_sigma(fork)
    window = (float(to_sigma(start)), float(to_sigma(end)))
    with UNetRecorder(fork.unet, limit=10) as rec:
        result = fork.txt2img(prompt="a cat", negative_prompt="blurry", steps=5, alwayson_scripts=pl.alwayson(
            _unit(*_payload_subjects(subjects), scale=scale, start=start, end=end)))
    assert "SSR error" not in result["info"] and "SSR-Encoder: True" in result["info"], result["info"]
    seen = _check_against_reference(fork, rec, subjects, scale, window=window)
    assert {on for _, on in seen} == {True, False}, (window, [float(o["sigmas"].max()) for _, _, o, _ in rec.calls])
    assert _leftovers(fork) == []


def _empty_window(to_sigma, sigmas):
    """The widest [start, end) on a 1/1000 grid whose sigma window (to_sigma(end), to_sigma(start)]
    holds none of ``sigmas``."""
    grid = [i / 1000 for i in range(1001)]
    sig = [float(to_sigma(p)) for p in grid]
    best = None
    for i in range(len(grid)):
        for j in range(i + 1, len(grid)):
            if any(sig[j] < s <= sig[i] for s in sigmas):
                break
            if best is None or j - i > best[1] - best[0]:
                best = (i, j)
    assert best is not None and best[1] - best[0] >= 10, (sigmas, best)
    return grid[best[0]], grid[best[1]]


def test_window_with_no_sampler_step_is_reported(fork):
    """A window between two of the sampler's sigmas (found from a plain run's UNet calls):
    no call falls in it, so the image is the plain one and the infotext says not applied
    after sampling, never "SSR-Encoder: True"."""
    base = dict(prompt="a photo of a cat", negative_prompt="blurry")
    with UNetRecorder(fork.unet, limit=10) as rec:
        plain = fork.txt2img(**base)
    start, end = _empty_window(_percent_to_sigma(fork), [float(o["sigmas"].max()) for _, _, o, _ in rec.calls])
    result = fork.txt2img(**base, alwayson_scripts=pl.alwayson(
        _unit(*_payload_subjects(_subjects(1)), start=start, end=end)))
    assert np.array_equal(_image(result), _image(plain)), (start, end, result["info"])
    assert "SSR-Encoder: True" not in result["info"] and "SSR error" not in result["info"], result["info"]
    assert "covered none of the sampler's steps" in result["info"], result["info"]
    assert _leftovers(fork) == []


def test_bypass_module_hooks_beside_a_replace_patch_is_reported(fork, foreign_patch, monkeypatch):
    """The module-hook path (the WebUI's) forced on the fork, beside a replace patch: the host
    calls to_q / to_out directly, the layer's forward never runs: reported, never claimed."""
    from ssr_webui import patcher

    monkeypatch.setattr(patcher, "serves_by_patches", lambda sd_model: False)
    result = fork.txt2img(prompt="a cat", negative_prompt="blurry", steps=2,
                          alwayson_scripts=pl.alwayson(_unit(*_payload_subjects(_subjects(1)))))
    assert "SSR-Encoder: True" not in result["info"]
    assert "no cross-attention layer ran it" in result["info"], result["info"]
    assert "attention module's forward" in result["info"]
    assert _leftovers(fork) == []


def test_bypass_patches_dropped_is_reported(fork, monkeypatch):
    """The UNet called without any attn2 replace patch (something dropped them after our
    pre-hook): reported, never claimed."""
    unet = fork.unet
    forward = unet.forward

    def without_patches(*args, **kwargs):
        opts = dict(kwargs.get("transformer_options", {}))
        opts.pop("patches_replace", None)
        kwargs["transformer_options"] = opts
        return forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", without_patches)
    result = fork.txt2img(prompt="a cat", negative_prompt="blurry", steps=2,
                          alwayson_scripts=pl.alwayson(_unit(*_payload_subjects(_subjects(1)))))
    assert "SSR-Encoder: True" not in result["info"]
    assert "no cross-attention layer ran it" in result["info"], result["info"]
    assert "replace patches" in result["info"]


def test_hires_pass_is_patched_again(fork):
    extra = {"hr_additional_modules": ["Use same choices"]} if FORK == "forge" else {}  # see the hosts README
    with UNetRecorder(fork.unet, limit=100) as rec:
        result = fork.txt2img(prompt="a cat", negative_prompt="blurry", steps=2, enable_hr=True, hr_scale=1.5,
                              hr_second_pass_steps=2, denoising_strength=0.6, hr_upscaler="Latent",
                              alwayson_scripts=pl.alwayson(_unit(*_payload_subjects(_subjects(1)))), **extra)
    assert "SSR error" not in result["info"], result["info"]
    sizes = {tuple(args[0].shape[-2:]) for args, _, _, _ in rec.calls}
    assert len(sizes) == 2, sizes  # both passes sampled
    assert _leftovers(fork) == []


def _builtin_controlnet_model(prefix):
    import importlib

    global_state = importlib.import_module("lib_controlnet.global_state")  # the fork's built-in ControlNet
    global_state.update_controlnet_filenames()
    names = [n for n in global_state.get_all_controlnet_names() if n.startswith(prefix)]
    assert names, global_state.get_all_controlnet_names()
    return names[0]


def _beside_a_builtin_unit(fork, unit, subjects, scale, limit):
    """Plain, the built-in ControlNet ``unit`` alone, the unit with SSR (its UNet calls
    recorded), the unit alone again: both applied, each changing the image, and the unit's
    image exactly what it was before ours ran. -> the recorder."""
    what = unit["module"] if unit["module"] != "None" else unit["model"]
    controlnet = {"ControlNet": {"args": [unit]}}
    base = dict(prompt="a cat", negative_prompt="blurry", steps=2)
    plain = fork.txt2img(**base)
    unit_only = fork.txt2img(**base, alwayson_scripts=dict(controlnet))
    with UNetRecorder(fork.unet, limit=limit) as rec:
        both = fork.txt2img(**base, alwayson_scripts=dict(controlnet, **pl.alwayson(
            _unit(*_payload_subjects(subjects), scale=scale))))
    unit_again = fork.txt2img(**base, alwayson_scripts=dict(controlnet))
    assert "SSR error" not in both["info"] and "SSR-Encoder: True" in both["info"], both["info"]
    assert np.abs(_image(unit_only) - _image(plain)).max() > 0, f"{what} changed nothing"
    assert np.abs(_image(both) - _image(unit_only)).max() > 0, f"SSR changed nothing beside {what}"
    assert np.array_equal(_image(unit_again), _image(unit_only))
    assert _leftovers(fork) == []
    return rec


def test_builtin_ip_adapter_together(fork):
    """The fork's own IP-Adapter (a ControlNet unit: "CLIP-ViT-H (IPAdapter)" with an
    ip-adapter_sd15 model) and SSR in one generation: both applied (ours chained to its attn2
    patch on every key), and without ours its image is exactly what it was."""
    unit = {"enabled": True, "module": "CLIP-ViT-H (IPAdapter)", "model": _builtin_controlnet_model("ip-adapter_sd15_random"),
            "image": pl.encode(pl.reference_image(5, 224, 224)), "weight": 0.8, "resize_mode": "Crop and Resize"}
    rec = _beside_a_builtin_unit(fork, unit, _subjects(1), 0.65, limit=1)
    attn2 = rec.calls[0][2]["patches_replace"]["attn2"]
    for key in _keys():
        patch = attn2.get(key, attn2.get(key + (0,)))
        assert type(patch).__name__ == "AttentionPatch", key
        assert patch.previous is not None and type(patch.previous).__name__ != "AttentionPatch", key


def test_builtin_controlnet_together(fork):
    """The fork's own ControlNet (a unit without preprocessor, a random SD1.5 ControlNet) and
    SSR in one generation: both change the image, every recorded UNet call (with the
    ControlNet's residuals as the host passed them) equals the reference, and without ours
    the ControlNet image is exactly what it was."""
    unit = {"enabled": True, "module": "None", "model": _builtin_controlnet_model("control_sd15_random"),
            "image": pl.encode(pl.reference_image(6, 64, 64)), "weight": 1.0, "resize_mode": "Crop and Resize"}
    subjects, scale = _subjects(1), 0.8
    rec = _beside_a_builtin_unit(fork, unit, subjects, scale, limit=2)
    assert any(kw.get("control") for _, kw, _, _ in rec.calls), "the UNet calls carried no ControlNet residuals"
    _check_against_reference(fork, rec, subjects, scale)


@pytest.mark.skipif(FORK != "forge", reason="only Forge's backend offloads the text encoder (backend.memory_management)")
def test_text_encoder_loaded_the_host_way_before_queries(fork, monkeypatch):
    """Forge keeps the text encoder offloaded until its memory manager loads it: with every
    model unloaded first, encoding a query not seen before loads the text encoder's patcher
    through ``memory_management.load_model_gpu`` from our code (not only from the host's own
    prompt encoding), and the generation applies."""
    from backend import memory_management

    real = memory_management.load_model_gpu
    ours = []

    def spy(model):
        caller = sys._getframe(1).f_code.co_filename
        if os.sep + "ssr_webui" + os.sep in caller:
            ours.append(model)
        return real(model)

    monkeypatch.setattr(memory_management, "load_model_gpu", spy)
    memory_management.unload_all_models()
    subject = {"image": pl.encode(pl.reference_image(3)), "query": "a query no test encoded before", "weight": 1.0}
    result = fork.txt2img(prompt="a photo of a cat", negative_prompt="blurry", steps=2,
                          alwayson_scripts=pl.alwayson(_unit(subject)))
    assert "SSR error" not in result["info"] and "SSR-Encoder: True" in result["info"], result["info"]
    assert any(model is fork.sd_model.forge_objects.clip.patcher for model in ours), ours


def test_patch_registered_after_ours_is_chained(fork, monkeypatch):
    """Either order: a script that runs after ours registers its own attn2 replace patch on
    every key of the same patcher clone without calling ours (here: plain attention scaled by
    1.1). At every UNet call ours is wrapped around it again, so both apply: each call equals
    the reference with that patch as the base attention."""
    from ssr_webui import patcher

    install = patcher.install

    def later(q, k, v, extra):
        return 1.1 * attend(q, k, v, extra["n_heads"])

    def install_then_replaced(session, sd_model, layers):
        original, clone = install(session, sd_model, layers)
        for name, number in _keys():
            clone.set_model_attn2_replace(later, name, number)
        return original, clone

    monkeypatch.setattr(patcher, "install", install_then_replaced)
    subjects, scale = _subjects(1), 0.8
    with UNetRecorder(fork.unet, limit=2) as rec:
        result = fork.txt2img(prompt="a cat", negative_prompt="blurry", steps=2,
                              alwayson_scripts=pl.alwayson(_unit(*_payload_subjects(subjects), scale=scale)))
    assert "SSR error" not in result["info"] and "SSR-Encoder: True" in result["info"], result["info"]
    _check_against_reference(fork, rec, subjects, scale, previous=later)
    assert _leftovers(fork) == []
