"""Generation through the stand-in WebUI: every CFG row layout checked against a direct computation,
disabled = bit-identical, start/end, hooks removed after success / exception / interrupt / unload,
failures visible and nothing half-applied."""
from __future__ import annotations

import copy
import gc
import json

import numpy as np
import pytest
import torch

import ssr
from ssr.layers import find_cross_attention_layers
from ssr_webui.session import ROUTE_HOOK_ATTR

from ssr_webui_testenv import (CLIP, PAIR, SINGLE, TITLE, box_mask, harness, hooks_left, png_b64, reference_image,
                      script_callbacks, shared, ssr_args, start)

GEN = dict(prompt="a cat", negative_prompt="blurry, ugly", steps=2, width=64, height=64, seed=11, cfg_scale=5.0)
LONG_PROMPT = ", ".join(f"word{i}" for i in range(30))  # 109 tokens: a 154-token context


# ----------------------------------------------------------------------------- helpers

def images(processed):
    """All output images (grid included) as one flat uint8 array, for exact comparisons."""
    return np.concatenate([np.asarray(im).reshape(-1) for im in processed.images])


def assert_clean(env):
    assert ssr.installed_subject_attention(env.unet) is None
    assert not hasattr(env.unet, ROUTE_HOOK_ATTR)
    assert hooks_left(env.unet) == 0
    assert env.runtime.active is None


class Recorder:
    """Records every UNet call of a generation (inputs, output, the step's fraction and the rows' kinds
    by position: the denoiser feeds cond rows first, then uncond rows -- webui-host.md section 6)."""

    def __init__(self, env):
        self.calls, self.steps = [], []
        self._n_cond = self._n_uncond = self._seen = 0
        self._fraction = None
        self._hook = env.unet.register_forward_hook(self._record, with_kwargs=True)
        env.on("cfg_denoiser", self._on_step)

    def _on_step(self, params):
        self._n_cond, self._n_uncond = params.text_cond.shape[0], params.text_uncond.shape[0]
        self._seen = 0
        self._fraction = params.denoiser.step / params.denoiser.total_steps  # this denoiser call of the pass
        self.steps.append(self._fraction)

    def _record(self, module, args, kwargs, output):
        x = kwargs.get("x", args[0] if args else None)
        t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        kinds = []
        for r in range(x.shape[0]):
            position = self._seen + r
            kinds.append(0 if position < self._n_cond else 1 if position < self._n_cond + self._n_uncond else None)
        self._seen += x.shape[0]
        self.calls.append(dict(x=x.detach().clone(), t=t.detach().clone(), context=context.detach().clone(),
                               out=output.detach().clone(), kinds=kinds, fraction=self._fraction))

    def close(self):
        self._hook.remove()


def expected_subjects(core_embedder, subjects):
    """The subject contexts, computed with the core library directly from the files."""
    return core_embedder.ssr, core_embedder.encode(subjects)


def reference_attn2(layer, kv, kinds, tokens, value_weights, scale):
    """attn2 with the subject branch, written out: softmax(QK^T/sqrt(d))V + scale * softmax(QK_S^T/sqrt(d))V_S,
    per row with that row's subject context (or none), then the layer's output projection."""
    def forward(x, context=None, mask=None):
        h = layer.heads

        def split(t):
            b, n, c = t.shape
            return t.reshape(b, n, h, c // h).transpose(1, 2)

        q, k, v = split(layer.to_q(x)), split(layer.to_k(context)), split(layer.to_v(context))
        d = q.shape[-1]
        out = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1) @ v
        for r, kind in enumerate(kinds):
            if kind is None or scale == 0:
                continue
            ks = split((tokens[kind] @ kv.to_k.weight.T)[None])
            vs = split(((tokens[kind] @ kv.to_v.weight.T) * value_weights[:, None])[None])
            out[r:r + 1] = out[r:r + 1] + scale * (torch.softmax(q[r:r + 1] @ ks.transpose(-1, -2) / d ** 0.5, dim=-1) @ vs)
        b, _, n, _ = out.shape
        return layer.to_out(out.transpose(1, 2).reshape(b, n, -1))
    return forward


def check_calls_against_reference(env, recorder, weights, encoded, scale, start=0.0, end=1.0):
    """Re-run every recorded UNet call with the reference attn2 and compare. -> number of calls with the branch on."""
    unet = env.unet
    assert hooks_left(unet) == 0
    layers = [layer for _, layer in find_cross_attention_layers(unet)]
    active, effect_checked, seen = 0, False, set()
    with torch.no_grad():
        for call in recorder.calls:
            on = start <= call["fraction"] < end
            kinds = call["kinds"] if on else [None] * len(call["kinds"])
            shape = (tuple(kinds), call["x"].shape, call["context"].shape)
            if shape in seen:  # same row layout as a call already checked: the same code path
                active += on and any(k is not None for k in kinds)
                continue
            seen.add(shape)
            for layer, kv in zip(layers, weights.attention):
                layer.forward = reference_attn2(layer, kv, kinds, encoded.tokens, encoded.value_weights, scale)
            try:
                expected = unet(call["x"], call["t"], context=call["context"])
            finally:
                for layer in layers:
                    del layer.forward
            if on and any(k is not None for k in kinds):
                active += 1
                torch.testing.assert_close(call["out"], expected, rtol=1e-4, atol=1e-4)
                if not effect_checked:  # the comparison is not vacuous: the branch changes the output
                    plain = unet(call["x"], call["t"], context=call["context"])
                    assert (call["out"] - plain).abs().max() > 1e-3, "the branch had no visible effect"
                    effect_checked = True
            else:
                plain = unet(call["x"], call["t"], context=call["context"])
                assert torch.equal(call["out"], plain), "outside [start, end) the UNet output must be untouched"
    return active


def run(env, args, runner=None, img2img=False, **overrides):
    gen = dict(GEN, **overrides)
    if img2img:
        return harness.img2img(runner or env.img2img, script_args_by_title={TITLE: args}, **gen)
    return harness.txt2img(runner or env.txt2img, script_args_by_title={TITLE: args}, **gen)


# ----------------------------------------------------------------------------- layouts

LAYOUTS = {
    "batch_size_2": (dict(batch_size=2), {}),
    "batch_count_2": (dict(n_iter=2), {}),
    "and_prompt": (dict(prompt="a cat AND a dog :0.7", batch_size=2), {}),
    # per-image prompts with 2 and 1 sub-prompts: rows c c c u u, run in chunks of 2 -> [c c] [c u] [u]
    "chunked_mixed": (dict(prompt=["a cat AND a dog", "a hat"], batch_size=2), {"batch_cond_uncond": False}),
    "skipped_uncond": (dict(steps=3), {"skip_early_cond": 0.5}),
    "long_prompt_separate_calls": (dict(prompt=LONG_PROMPT), {}),
    "long_prompt_padded": (dict(prompt=LONG_PROMPT), {"pad_cond_uncond": True}),
    "long_negative_v0_truncated": (dict(negative_prompt=LONG_PROMPT), {"pad_cond_uncond_v0": True}),
    "same_prompt_and_negative": (dict(prompt="a cat", negative_prompt="a cat", batch_size=2), {}),
    "hires_fix": (dict(enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2, denoising_strength=0.6), {}),
}


def _kinds(call):
    return tuple(call["kinds"])


# What each layout must have produced, so that a test cannot pass on a layout that did not happen.
LAYOUT_SHAPES = {
    "batch_size_2": lambda calls: {_kinds(c) for c in calls} == {(0, 0, 1, 1)},
    "batch_count_2": lambda calls: len(calls) == 2 * GEN["steps"] and {_kinds(c) for c in calls} == {(0, 1)},
    "and_prompt": lambda calls: {_kinds(c) for c in calls} == {(0, 0, 0, 0, 1, 1)},
    "chunked_mixed": lambda calls: [_kinds(c) for c in calls[:3]] == [(0, 0), (0, 1), (1,)],
    "skipped_uncond": lambda calls: [_kinds(c) for c in calls] == [(0,), (0,), (0, 1)],
    "long_prompt_separate_calls": lambda calls: [(_kinds(c), c["context"].shape[1]) for c in calls[:2]] == [((0,), 154), ((1,), 77)],
    "long_prompt_padded": lambda calls: {(_kinds(c), c["context"].shape[1]) for c in calls} == {((0, 1), 154)},
    "long_negative_v0_truncated": lambda calls: {(_kinds(c), c["context"].shape[1]) for c in calls} == {((0, 1), 77)},
    "same_prompt_and_negative": lambda calls: torch.equal(calls[0]["context"][0], calls[0]["context"][2]),
    "hires_fix": lambda calls: [c["x"].shape[-1] for c in calls] == [8, 8, 16, 16],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_rows_match_direct_computation(webui, core_embedder, monkeypatch, layout):
    gen, options = LAYOUTS[layout]
    for key, value in options.items():
        monkeypatch.setitem(shared.opts.data, key, value)
    image = reference_image(1)
    weights, encoded = expected_subjects(core_embedder, [ssr.Subject(image, "a dog")])
    recorder = Recorder(webui)
    decisions = {}
    webui.on("cfg_after_cfg", lambda params: decisions.update(webui.runtime.active.router.decisions))
    processed = run(webui, ssr_args((image, "a dog", 1.0, 5.0)), **gen)
    recorder.close()
    # how the extension told the rows apart: by matching the step's conds, or by position when they are identical
    assert decisions.get("none", 0) == 0
    assert decisions.get("position" if layout == "same_prompt_and_negative" else "match", 0) > 0
    assert f"{TITLE}: True" in processed.info and "SSR error" not in processed.info
    assert_clean(webui)
    assert LAYOUT_SHAPES[layout](recorder.calls), [(_kinds(c), tuple(c["context"].shape)) for c in recorder.calls]
    active = check_calls_against_reference(webui, recorder, weights, encoded, scale=0.65)
    assert active == len(recorder.calls)


def test_img2img_and_inpainting_with_mask_query(webui, core_embedder):
    image = reference_image(2)
    mask = box_mask()
    subjects = [ssr.Subject(image, "", mask=np.asarray(mask.convert("L"), np.float32) / 255.0, weight=0.8, mask_weight=4.0),
                ssr.Subject(reference_image(3), "a hat", weight=1.3)]
    weights, encoded = expected_subjects(core_embedder, subjects)
    args = ssr_args(({"image": image, "mask": mask}, "", 0.8, 4.0), (reference_image(3), "a hat", 1.3, 5.0), scale=0.5)
    init = reference_image(4, 64, 64)
    for extra in ({}, {"mask": box_mask(64, 64, (0, 0, 32, 64)).convert("L")}):
        recorder = Recorder(webui)
        processed = run(webui, args, img2img=True, init_images=[init], denoising_strength=0.75, **extra)
        recorder.close()
        assert "SSR 1 mode: mask" in processed.info and "SSR 2 mode: text" in processed.info
        assert check_calls_against_reference(webui, recorder, weights, encoded, scale=0.5) == len(recorder.calls) > 0
        assert_clean(webui)


def test_start_end_switch_the_branch_per_step(webui, core_embedder):
    image = reference_image(1)
    weights, encoded = expected_subjects(core_embedder, [ssr.Subject(image, "a dog")])
    recorder = Recorder(webui)
    processed = run(webui, ssr_args((image, "a dog", 1.0, 5.0), start=0.3, end=0.7), steps=5)
    recorder.close()
    assert recorder.steps == [0.0, 0.2, 0.4, 0.6, 0.8]
    active = check_calls_against_reference(webui, recorder, weights, encoded, scale=0.65, start=0.3, end=0.7)
    assert active == 2  # steps 0.4 and 0.6
    assert "SSR start: 0.3, SSR end: 0.7" in processed.infotexts[0]


def test_disabled_is_bit_identical_to_no_extension(models_path, sd_model_pristine):
    plain = start(copy.deepcopy(sd_model_pristine))
    harness.reset_webui_state()
    no_extension = harness.start_webui([], sd_model=copy.deepcopy(sd_model_pristine))
    baseline = images(harness.txt2img(no_extension[0], **GEN, batch_size=2))
    harness.reset_webui_state()
    env = start(plain.model)
    disabled = ssr_args((reference_image(1), "a dog", 1.0, 5.0), enabled=False)
    assert np.array_equal(images(run(env, disabled, batch_size=2)), baseline)
    enabled = images(run(env, ssr_args((reference_image(1), "a dog", 1.0, 5.0)), batch_size=2))
    assert not np.array_equal(enabled, baseline)
    assert np.array_equal(images(run(env, disabled, batch_size=2)), baseline)  # nothing left behind
    harness.reset_webui_state()


# ----------------------------------------------------------------------------- hooks removed

def test_hooks_removed_after_interrupt(webui):
    calls = []

    def interrupt(params):
        calls.append(params.denoiser.step)
        if params.denoiser.step == 1:
            shared.state.interrupted = True
    webui.on("cfg_denoiser", interrupt)
    processed = run(webui, ssr_args((reference_image(1), "a dog", 1.0, 5.0)), n_iter=2, steps=3)
    assert calls == [0, 1] and len(processed.images) == 1  # stopped in the first batch
    assert_clean(webui)


def test_hooks_removed_after_exception(webui):
    seen = {}

    def explode(module, args):
        seen["installed"] = ssr.installed_subject_attention(webui.unet) is not None
        raise RuntimeError("boom in the UNet")
    boom = webui.unet.out.register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        run(webui, ssr_args((reference_image(1), "a dog", 1.0, 5.0)))
    boom.remove()
    assert seen["installed"]
    gc.collect()  # the processing object is gone, and its session's hooks with it
    assert_clean(webui)


def test_stale_hooks_cleared_by_the_next_generation(webui):
    """An exception while the processing object stays referenced (e.g. by a traceback) leaves the hooks;
    the next generation -- here after a script reload, with a new runtime, and SSR disabled -- removes them."""
    image = reference_image(1)
    baseline = images(run(webui, ssr_args((image, "a dog", 1.0, 5.0), enabled=False)))
    kept = []
    webui.on("cfg_denoiser", lambda params: kept.append(params.denoiser.p))
    boom = webui.unet.out.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        run(webui, ssr_args((image, "a dog", 1.0, 5.0)))
    boom.remove()
    assert kept and ssr.installed_subject_attention(webui.unet) is not None
    env = start(webui.model)  # UI reload: the script module is imported again
    assert env.runtime is not webui.runtime
    out = images(run(env, ssr_args((image, "a dog", 1.0, 5.0), enabled=False)))
    assert_clean(env)
    assert np.array_equal(out, baseline)


def test_script_unload_releases_hooks_and_caches(webui):
    seen = {}

    def unload_mid_generation(params):
        if params.denoiser.step == 1 and "active" not in seen:
            seen["active"] = webui.runtime.active is not None
            script_callbacks.script_unloaded_callback()
    run(webui, ssr_args((reference_image(1), "a dog", 1.0, 5.0)))
    assert len(webui.runtime._embedders) == 1  # cached across generations
    webui.on("cfg_denoiser", unload_mid_generation)
    run(webui, ssr_args((reference_image(1), "a dog", 1.0, 5.0)))
    assert seen["active"]
    assert len(webui.runtime._embedders) == 0
    assert_clean(webui)


# ----------------------------------------------------------------------------- API and models

def api_request(args, **overrides):
    return dict(GEN, alwayson_scripts={"ssr-encoder": {"args": args}}, **overrides)


def test_api_dict_args_equal_positional_ui_args(webui):
    image = reference_image(1)
    ui_out = images(run(webui, ssr_args((image, "a dog", 1.2, 5.0), scale=0.7, end=0.9, model=PAIR)))
    unit = {"enabled": True, "scale": 0.7, "end": 0.9, "model": PAIR, "clip_model": CLIP,
            "subjects": [{"image": "data:image/png;base64," + png_b64(image), "query": "a dog", "weight": 1.2}]}
    processed = harness.api_txt2img(api_request([unit]))
    assert np.array_equal(images(processed), ui_out)
    info = json.loads(processed.js())
    params = info["extra_generation_params"]
    assert params["SSR model"] == PAIR and params["SSR scale"] == "0.7" and params["SSR 1 query"] == "a dog"
    assert len(params["SSR model hash"]) == 8
    positional = harness.api_txt2img(api_request([True, 0.7, 0.0, 0.9, PAIR, CLIP, png_b64(image), "a dog", 1.2, 5.0]))
    assert np.array_equal(images(positional), ui_out)
    assert_clean(webui)


BAD_API_UNITS = [
    ({"subjects": [{"image": "%%%", "query": "a dog"}]}, "subjects[0].image: not valid base64"),
    ({"scale": 9, "subjects": []}, "scale:"),
    ({"model": "missing.safetensors"}, "model: 'missing.safetensors' not found"),
    ({"clip_model": "nope"}, "clip_model: 'nope' not found"),
    ({"subjects": [{"image": None}]}, "subjects[0].image: missing"),
    ({"weight": 1}, "args[0]: unknown keys ['weight']"),
]


@pytest.mark.parametrize("unit,message", BAD_API_UNITS)
def test_invalid_api_input_is_reported_and_not_applied(webui, unit, message):
    baseline = images(harness.api_txt2img(dict(GEN)))
    full = {"subjects": [{"image": png_b64(reference_image(1)), "query": "a dog"}]}
    full.update(unit)
    processed = harness.api_txt2img(api_request([full]))
    info = json.loads(processed.js())  # what the API returns as "info"
    assert message in info["extra_generation_params"]["SSR error"]
    assert "SSR error: " in info["infotexts"][0]
    assert "SSR scale" not in info["extra_generation_params"]
    assert message in processed.comments  # shown under the images in the UI
    assert np.array_equal(images(processed), baseline)


@pytest.mark.parametrize("family", ["SD2.x", "SDXL"])
def test_wrong_model_family_is_reported(models_path, family):
    from ssr_webui_testenv import tiny_sd
    env = start(tiny_sd.make_tiny_sd2_model() if family == "SD2.x" else tiny_sd.make_tiny_sdxl_model())
    seen = []
    script_callbacks.on_cfg_denoiser(lambda params: seen.append((params.denoiser.p, ssr.installed_subject_attention(env.unet))))
    try:
        run(env, ssr_args((reference_image(1), "a dog", 1.0, 5.0)))
    except Exception as e:  # the stand-in's tiny SDXL decodes to NaN (a stand-in limitation): check p itself
        assert family == "SDXL" and "NaN" in str(e)
    p = seen[0][0]
    assert all(handle is None for _, handle in seen)  # never installed
    message = f"SSR-Encoder was not applied: the loaded checkpoint is {family}"
    assert any(message in c for c in p.comments)
    assert "SSR scale" not in p.extra_generation_params and "SSR error" in p.extra_generation_params
    assert_clean(env)
    harness.reset_webui_state()


@pytest.mark.parametrize("broken", ["ssr", "clip"])
def test_broken_weight_file_is_reported(webui, weight_files, tmp_path, monkeypatch, broken):
    import shutil
    models = tmp_path / "models"
    shutil.copytree(weight_files.models_path, models)
    target = models / "ssr_encoder" / SINGLE if broken == "ssr" else models / CLIP / "model.safetensors"
    target.write_bytes(target.read_bytes()[:200])  # a truncated download
    monkeypatch.setattr(harness.scripts.paths, "models_path", str(models))
    baseline = images(run(webui, ssr_args((reference_image(1), "a dog", 1.0, 5.0), enabled=False)))
    processed = run(webui, ssr_args((reference_image(1), "a dog", 1.0, 5.0)))
    assert "SSR-Encoder was not applied" in processed.comments
    assert str(target) in processed.comments and str(target) in processed.infotexts[0]
    assert np.array_equal(images(processed), baseline)
    assert_clean(webui)


def test_infotext_round_trip(webui):
    from modules import infotext_utils
    args = ssr_args((reference_image(1), 'the "red" dog, small', 1.25, 5.0),
                    ({"image": reference_image(2), "mask": box_mask()}, "", 0.5, 7.5), scale=0.55, start=0.1, end=0.8)
    processed = run(webui, args)
    params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    script = webui.txt2img.script(TITLE)
    controls = script.controls
    ours = [(c, k) for c, k in webui.txt2img.infotext_fields if any(c is x for x in controls)]
    assert len(ours) == 6 + 3 * 3
    pasted = {}
    for component, key in ours:
        if key in params:  # the WebUI's connect_paste conversion: type of the control's value applied to the text
            value = params[key]
            valtype = type(component.value)
            pasted[next(i for i, x in enumerate(controls) if x is component)] = False if valtype == bool and value == "False" else \
                float(value) if valtype == int else valtype(value)
    expected = {0: True, 1: 0.55, 2: 0.1, 3: 0.8, 4: SINGLE, 5: CLIP, 7: 'the "red" dog, small', 8: 1.25,
                11: "", 12: 0.5, 13: 7.5}
    assert pasted == expected
    assert {key for _, key in ours} <= set(webui.txt2img.paste_field_names)
