"""Generation with SSR-Encoder in the real WebUI v1.10.1, over its HTTP API (tiny checkpoint,
64x64, 2-4 steps): img2img, inpainting and the hires pass checked layer by layer
(``hostcheck.verify``); mask and text subjects, several subjects, weights, weight 0;
nothing left behind (plain generation bit-identical before and after every case, no module
hook left on the UNet) after success, scale 0, disabled, interrupt, an exception inside
sampling and script unload; the API dict form against the UI's positional form; invalid
input reported by field with an image made without SSR; the infotext round trip through the
WebUI's own parser and paste code; all three weight formats; broken weight files; a
checkpoint switch."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import hostcheck
import payloads as pl
from conftest import EXTENSION_DIR, MODELS

PROMPT = dict(prompt="a photo of a cat", negative_prompt="blurry")
SSR_DIR = os.path.join(MODELS, "ssr_encoder")
CLIP_DIR = os.path.join(MODELS, pl.CLIP)


# ----------------------------------------------------------------------------- helpers

def pixels(result: dict) -> np.ndarray:
    """Every returned image's pixels, stacked (exact comparisons)."""
    assert result["images"], "no image returned"
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(im))).convert("RGB")) for im in result["images"]])


def info(result: dict) -> dict:
    return json.loads(result["info"])


def ssr_error(result: dict) -> str:
    return str(info(result)["extra_generation_params"].get("SSR error", ""))


def hook_count(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def runtime(host):
    return host.script.runtime


def subject_dict(seed=0, query="the red thing", weight=None, mask=None, mask_weight=None):
    d = {"image": pl.encode(pl.reference_image(seed)), "query": query}
    if weight is not None:
        d["weight"] = weight
    if mask is not None:
        d["mask"] = pl.encode(mask)
    if mask_weight is not None:
        d["mask_weight"] = mask_weight
    return d


def core_subject(seed=0, query="the red thing", weight=1.0, mask=None, mask_weight=5.0):
    """The same subject for the core library (mask: white-on-black L image -> [0, 1] array)."""
    import ssr

    array = None if mask is None else np.asarray(mask.convert("L"), np.float32) / 255.0
    return ssr.Subject(image=pl.reference_image(seed), query=query, mask=array, weight=weight, mask_weight=mask_weight)


_REFERENCE = {}


def core_embedder(host, model=pl.TINY_SSR):
    """The core library's ``SubjectEmbedder`` on the weight files a generation used (loaded
    once per module, as ``hostcheck.subject_reference`` loads them) and the loaded
    checkpoint's text encoder."""
    import ssr
    from ssr.query_encoder import encode_query_tokens, hf_query_tokens

    if model not in _REFERENCE:
        weights = ssr.load_ssr_weights(os.path.join(SSR_DIR, model))
        _REFERENCE[model] = (weights, ssr.load_clip_image_encoder(CLIP_DIR, expect_width=weights.encoder.config.image_dim))
    weights, clip = _REFERENCE[model]
    wrapped = host.shared.sd_model.cond_stage_model.wrapped

    def encode_text(texts):
        with torch.no_grad():
            return encode_query_tokens(wrapped.transformer, hf_query_tokens(wrapped.tokenizer, texts))

    return ssr.SubjectEmbedder(clip, weights, encode_text)


def expectation(host, subjects, model=pl.TINY_SSR, scale=0.65, active_steps=None):
    """What ``hostcheck.verify`` checks the rows against: the core library's subject tokens."""
    embedder = core_embedder(host, model)
    with torch.no_grad():
        encoded = embedder.encode(list(subjects))
    weights = embedder.ssr
    return hostcheck.Expectation(encoded.tokens, encoded.value_weights, weights, scale, active_steps)


def generate(host, route="txt2img", unit=None, **payload):
    payload = dict(PROMPT, **payload)
    if unit is not None:
        payload["alwayson_scripts"] = pl.alwayson(unit)
    return getattr(host, route)(**payload)


_PLAIN = {}


def plain(host, route="txt2img", **payload) -> np.ndarray:
    """The image without SSR for ``payload`` (computed once per module, on the tiny checkpoint)."""
    key = (route, json.dumps(payload, sort_keys=True))
    if key not in _PLAIN:
        result = generate(host, route, **payload)
        assert "SSR" not in result["info"], result["info"]
        _PLAIN[key] = pixels(result)
    return _PLAIN[key]


@contextlib.contextmanager
def denoiser_callback(fn):
    """An ``on_cfg_denoiser`` callback of the test, registered in the WebUI for the block."""
    from modules import script_callbacks

    script_callbacks.on_cfg_denoiser(fn)
    try:
        yield
    finally:
        script_callbacks.remove_callbacks_for_function(fn)


def installed_probe(host):
    """A denoiser callback that notes, per step, how many module hooks the UNet carries and
    whether the subject attention is installed (so a "nothing left" check cannot pass on a
    run that never installed anything)."""
    import ssr

    seen = []

    def probe(params):
        unet = host.unet
        seen.append((hook_count(unet), ssr.installed_subject_attention(unet) is not None))
    return probe, seen


def assert_clean(host, baseline_hooks):
    import ssr
    from ssr_webui.session import ROUTE_HOOK_ATTR

    unet = host.unet
    assert hook_count(unet) == baseline_hooks, f"{hook_count(unet) - baseline_hooks} module hook(s) left on the UNet"
    assert ssr.installed_subject_attention(unet) is None
    assert not hasattr(unet, ROUTE_HOOK_ATTR)
    assert runtime(host).active is None


@pytest.fixture(scope="module")
def baseline(host):
    """Before any SSR generation of this module: the UNet's hook count and the plain image."""
    from conftest import TINY_CKPT

    host.load_checkpoint(TINY_CKPT)
    hooks = hook_count(host.unet)
    _PLAIN.clear()  # plain images are this module's: options may differ between modules
    image = plain(host)
    return {"hooks": hooks, "plain": image}


@pytest.fixture
def clean(tiny_host, baseline):
    """After the test: no hook left, and plain generation bit-identical to plain before."""
    yield tiny_host
    from conftest import TINY_CKPT

    tiny_host.load_checkpoint(TINY_CKPT)
    assert_clean(tiny_host, baseline["hooks"])
    after = generate(tiny_host)
    assert "SSR" not in after["info"]
    assert np.array_equal(pixels(after), baseline["plain"]), "plain generation changed after this SSR case"
    assert_clean(tiny_host, baseline["hooks"])


def verified(host, result, expect, kinds=("subject", "unconditional-subject")):
    assert "SSR error" not in result["info"], result["info"]
    counts = hostcheck.verify(result["_recorder"], host.unet, expect)
    for kind in kinds:
        assert counts[kind] > 0, counts
    return counts


def recorded(host, route="txt2img", unit=None, **payload):
    with hostcheck.AttentionRecorder(host.unet) as rec:
        result = generate(host, route, unit, **payload)
    result["_recorder"] = rec
    return result


# ----------------------------------------------------------------------------- img2img, inpainting, hires

INIT = pl.encode(pl.reference_image(7, 64, 64))


def test_img2img_checked_layer_by_layer(clean):
    host = clean
    unit = pl.ssr_unit(subject_dict(0))
    result = recorded(host, "img2img", unit, init_images=[INIT], denoising_strength=0.6, steps=4)
    verified(host, result, expectation(host, [core_subject(0)]))
    # denoising strength 0.6 of 4 steps: fewer denoiser steps than ``steps``
    assert 0 < len(result["_recorder"].steps) < 4, len(result["_recorder"].steps)
    assert not np.array_equal(pixels(result), plain(host, "img2img", init_images=[INIT], denoising_strength=0.6, steps=4))


def window(start, end, totals):
    """Recorder step numbers where the branch must act: each sampling pass has its own denoiser
    whose ``step / total_steps`` is the fraction the window applies to; ``totals``: per pass
    (the WebUI's total_steps of the denoiser, the number of calls it made)."""
    active, offset = set(), 0
    for total, calls in totals:
        active |= {offset + k for k in range(calls) if start <= k / total < end}
        offset += calls
    return active


def test_inpainting_with_a_start_window_checked_layer_by_layer(clean):
    """Two text subjects with weights, start 0.5. img2img with 4 steps at strength 0.75: the
    WebUI's denoiser counts t_enc + 1 = int(0.75 * 4) + 1 = 4 steps and makes as many calls
    (fractions 0, 0.25, 0.5, 0.75): the branch acts on the last two only."""
    host = clean
    mask = pl.encode(pl.box_mask(64, 64, (0, 0, 32, 64)))
    unit = pl.ssr_unit(subject_dict(0, weight=0.8), subject_dict(1, "the blue thing", weight=1.4), scale=0.5, start=0.5)
    payload = dict(init_images=[INIT], mask=mask, denoising_strength=0.75, inpainting_fill=1, mask_blur=0, steps=4)
    result = recorded(host, "img2img", unit, **payload)
    assert len(result["_recorder"].steps) == 4
    counts = verified(host, result, expectation(host, [core_subject(0, weight=0.8), core_subject(1, "the blue thing", weight=1.4)],
                                                scale=0.5, active_steps=window(0.5, 1.0, [(4, 4)])))
    assert counts["plain"] > 0, counts
    out, base = pixels(result), plain(host, "img2img", **payload)
    assert not np.array_equal(out, base)
    # outside the mask the init image is kept (the WebUI pastes it back): SSR changes only the masked half
    assert np.array_equal(out[:, :, 40:], base[:, :, 40:])


def test_hires_pass_with_a_start_window_checked_layer_by_layer(clean):
    """txt2img 4 steps + hires pass 4 steps at strength 0.6, start 0.5: the first pass's
    denoiser counts 4 (calls at 0, 0.25, 0.5, 0.75), and so does the hires pass's (its 4
    requested steps); the branch acts on the last two calls of each pass. The recorder counts
    denoiser calls over both passes."""
    host = clean
    hires = dict(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_second_pass_steps=4, denoising_strength=0.6,
                 steps=4)
    result = recorded(host, "txt2img", pl.ssr_unit(subject_dict(0), start=0.5), **hires)
    rec = result["_recorder"]
    assert len(rec.steps) == 8
    active = window(0.5, 1.0, [(4, 4), (4, 4)])
    assert active == {2, 3, 6, 7}
    counts = verified(host, result, expectation(host, [core_subject(0)], active_steps=active))
    assert counts["plain"] > 0, counts
    sizes = {c.step: c.x.shape[1] for c in rec.calls if c.official == 1}
    assert sizes[6] == 4 * sizes[0], f"no hires pass seen: {sizes}"  # 16x16 latents after 8x8
    assert pixels(result).shape[1:3] == (128, 128)
    assert not np.array_equal(pixels(result), plain(host, **hires))


# ----------------------------------------------------------------------------- subjects

MASK = pl.box_mask()  # white box on black, the reference image's 96x72


def test_mask_and_text_subjects_with_weights(clean):
    """A mask subject (mask, empty query) and a text subject, each with its own weight."""
    host = clean
    unit = pl.ssr_unit(subject_dict(2, "", mask=MASK, weight=0.7, mask_weight=4.0),
                       subject_dict(3, "the blue thing", weight=1.3), scale=0.8)
    result = recorded(host, "txt2img", unit)
    expect = expectation(host, [core_subject(2, "", weight=0.7, mask=MASK, mask_weight=4.0),
                                core_subject(3, "the blue thing", weight=1.3)], scale=0.8)
    verified(host, result, expect)
    assert torch.allclose(expect.value_weights.unique(), torch.tensor([0.7, 1.3]))  # both weights reached the check
    text = info(result)["infotexts"][0]
    assert "SSR 1 mode: mask" in text and "SSR 2 mode: text" in text and "SSR 2 query: the blue thing" in text
    assert "SSR 1 query" not in text


def test_subject_weights_change_the_image(clean):
    host = clean
    one = pixels(generate(host, unit=pl.ssr_unit(subject_dict(0), subject_dict(1, "the blue thing"))))
    other = pixels(generate(host, unit=pl.ssr_unit(subject_dict(0), subject_dict(1, "the blue thing", weight=1.8))))
    assert not np.array_equal(one, other)
    assert not np.array_equal(one, plain(host))


def test_weight_zero_removes_the_subject(clean):
    host = clean
    only_a = generate(host, unit=pl.ssr_unit(subject_dict(0)))
    a_and_b0 = generate(host, unit=pl.ssr_unit(subject_dict(0), subject_dict(1, "the blue thing", weight=0.0)))
    b0_and_a = generate(host, unit=pl.ssr_unit(subject_dict(1, "the blue thing", weight=0.0), subject_dict(0)))
    assert "SSR error" not in a_and_b0["info"] and "SSR error" not in b0_and_a["info"]
    assert not np.array_equal(pixels(only_a), plain(host)), "subject A had no effect: the comparison would be vacuous"
    assert np.array_equal(pixels(a_and_b0), pixels(only_a))
    assert np.array_equal(pixels(b0_and_a), pixels(only_a))
    assert "SSR 2 weight: 0" in info(a_and_b0)["infotexts"][0]


# ----------------------------------------------------------------------------- exactly plain

NO_EFFECT = {
    "scale 0": (pl.ssr_unit(subject_dict(0), scale=0.0), None),
    "disabled": (pl.ssr_unit(subject_dict(0), enabled=False), None),
    "every weight 0": (pl.ssr_unit(subject_dict(0, weight=0.0), subject_dict(1, "x", weight=0.0)), "weight is 0"),
    "window without a step": (pl.ssr_unit(subject_dict(0), start=0.9, end=1.0), "covers no sampling step"),
}


@pytest.mark.parametrize("case", list(NO_EFFECT))
def test_no_effect_is_exactly_plain(clean, baseline, case):
    unit, note = NO_EFFECT[case]
    result = generate(clean, unit=unit)
    assert np.array_equal(pixels(result), baseline["plain"])
    assert "SSR error" not in result["info"]
    if note is not None:
        assert note in info(result)["infotexts"][0]
    if case == "disabled":
        assert "SSR" not in result["info"]


def test_unet_called_around_our_pre_hook_is_reported_not_applied(clean, baseline, monkeypatch):
    """A wrapper (another extension's, say) that runs the UNet's ``forward`` itself instead of
    calling the module: the subject attention is installed and switched on by the steps, but
    our UNet pre-hook never routes a row. No row gets the branch (the image is the plain one)
    and the infotext says not applied, never "SSR-Encoder: True"."""
    host = clean
    wrapper = host.shared.sd_model.model  # ldm's DiffusionWrapper around the UNet
    unet = wrapper.diffusion_model

    def around_the_module_call(x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return unet.forward(x, t, context=torch.cat(c_crossattn, 1))

    monkeypatch.setattr(wrapper, "forward", around_the_module_call)
    result = generate(host, unit=pl.ssr_unit(subject_dict(0)))
    monkeypatch.undo()
    text = info(result)["infotexts"][0]
    assert np.array_equal(pixels(result), baseline["plain"])
    assert "SSR-Encoder: True" not in text, text
    assert "never called" in ssr_error(result), text


# ----------------------------------------------------------------------------- nothing left behind

def test_hooks_removed_after_interrupt(clean, baseline):
    """POST /sdapi/v1/interrupt during the second step of the first of two batches."""
    import threading

    host = clean
    probe, seen = installed_probe(host)
    responses = []

    def interrupt_at_step_2(params):
        probe(params)
        if len(seen) == 2:
            thread = threading.Thread(target=lambda: responses.append(host.client.post("/sdapi/v1/interrupt")))
            thread.start()
            thread.join(30)

    with denoiser_callback(interrupt_at_step_2):
        result = generate(host, unit=pl.ssr_unit(subject_dict(0)), steps=4, n_iter=2)
    assert responses and responses[0].status_code == 200
    assert seen[0][1] and seen[0][0] > baseline["hooks"], "SSR was never installed"
    assert len(seen) == 2, f"sampling went on after the interrupt: {len(seen)} steps"
    assert len(result["images"]) == 1


def test_hooks_removed_after_an_exception_in_sampling(clean, baseline):
    """A UNet call raising (a module pre-hook of the test on the UNet's output layer, at the
    second step): the API answers with an error; no SSR hook stays behind."""
    host = clean
    probe, seen = installed_probe(host)

    def explode(module, args):
        if len(seen) >= 2:
            raise RuntimeError("boom inside sampling")

    handle = host.unet.out.register_forward_pre_hook(explode)
    try:
        with denoiser_callback(probe):
            r = host.client.post("/sdapi/v1/txt2img", json=dict(PROMPT, width=64, height=64, steps=3, seed=1234,
                                                                 sampler_name="Euler", cfg_scale=5.0,
                                                                 alwayson_scripts=pl.alwayson(pl.ssr_unit(subject_dict(0)))))
    finally:
        handle.remove()
    assert r.status_code == 500 and "boom inside sampling" in r.text, r.text[:500]
    assert seen[-1][1] and seen[-1][0] > baseline["hooks"] + 1, "SSR was not installed when the exception came"
    assert_clean(host, baseline["hooks"])


def test_script_unload_releases_hooks_and_caches(clean, baseline):
    """The script's own ``script_unloaded`` callback (what the WebUI calls before a UI reload),
    called in the middle of sampling: hooks and caches go; a later generation loads again and
    gives the same image."""
    from modules import script_callbacks

    host = clean
    ours = [c for c in script_callbacks.ordered_callbacks("script_unloaded")
            if os.path.realpath(c.script).startswith(os.path.realpath(EXTENSION_DIR))]
    assert len(ours) == 1, [c.script for c in script_callbacks.ordered_callbacks("script_unloaded")]
    unit = pl.ssr_unit(subject_dict(0))
    before = pixels(generate(host, unit=unit, steps=4))
    rt = runtime(host)
    assert len(rt._embedders) and len(rt._ssr) and len(rt._clip)
    probe, seen = installed_probe(host)

    def unload_at_step_2(params):
        probe(params)
        if len(seen) == 2:
            ours[0].callback()

    with denoiser_callback(unload_at_step_2):
        result = generate(host, unit=unit, steps=4)
    assert seen[0][1] and seen[1][1] and not any(installed for _, installed in seen[2:])
    assert (len(rt._embedders), len(rt._ssr), len(rt._clip)) == (0, 0, 0)
    assert not np.array_equal(pixels(result), before)  # the last steps ran without the subject
    assert_clean(host, baseline["hooks"])
    assert np.array_equal(pixels(generate(host, unit=unit, steps=4)), before)


# ----------------------------------------------------------------------------- invalid input

def _dict_unit(**changes):
    unit = pl.ssr_unit(subject_dict(0))
    unit.update(changes)
    return [unit]


def _positional(*slots, **globals_):
    g = dict(enabled=True, scale=0.65, start=0.0, end=1.0, model=pl.TINY_SSR, clip_model=pl.CLIP)
    g.update(globals_)
    return [g["enabled"], g["scale"], g["start"], g["end"], g["model"], g["clip_model"]] + [v for s in slots for v in s]


B64 = pl.encode(pl.reference_image(0))
BLACK = pl.encode(Image.new("L", (96, 72), 0))

# (script args, the field the error must name)
INVALID = {
    "bad base64": (_dict_unit(subjects=[{"image": "%%% not base64 %%%", "query": "a dog"}]), "subjects[0].image"),
    "not an image": (_dict_unit(subjects=[{"image": base64.b64encode(b"hello, world" * 10).decode(), "query": "a dog"}]),
                     "subjects[0].image"),
    "unknown model": (_dict_unit(model="missing.safetensors"), "model"),
    "unknown CLIP": (_dict_unit(clip_model="nope"), "clip_model"),
    "scale out of range": (_dict_unit(scale=9.0), "scale"),
    "scale not a number": (_dict_unit(scale="high"), "scale"),
    "start after end": (_dict_unit(start=0.8, end=0.2), "end"),
    "too many subjects": (_dict_unit(subjects=[subject_dict(i % 3) for i in range(9)]), "subjects"),
    "no subject": (_dict_unit(subjects=[]), "subjects"),
    "query without image": (_dict_unit(subjects=[{"query": "the dog"}]), "subjects[0].image"),
    "neither query nor mask": (_dict_unit(subjects=[{"image": B64, "query": ""}]), "subjects[0].query"),
    "empty mask": (_dict_unit(subjects=[{"image": B64, "query": "", "mask": BLACK}]), "subjects[0].mask"),
    "mask of another aspect": (_dict_unit(subjects=[subject_dict(0, "", mask=pl.box_mask(64, 64, (8, 8, 40, 40)))]),
                               "subjects[0].mask"),
    "weight out of range": (_dict_unit(subjects=[subject_dict(0, weight=5.0)]), "subjects[0].weight"),
    "second subject broken": (_dict_unit(subjects=[subject_dict(0), subject_dict(1, weight=-1)]), "subjects[1].weight"),
    "unknown key": (_dict_unit(weight=1.0), "args[0]"),
    "positional: weight": (_positional((B64, "a dog", 5.0, 5.0)), "Subject 1 weight"),
    "positional: query without image": (_positional((None, "a dog", 1.0, 5.0)), "Subject 1"),
    "positional: scale": (_positional((B64, "a dog", 1.0, 5.0), scale=3.0), "Subject scale"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input_is_named_and_not_applied(tiny_host, baseline, case):
    args, field_name = INVALID[case]
    payload = dict(PROMPT, alwayson_scripts={pl.TITLE: {"args": args}})
    result = tiny_host.txt2img(**payload)  # HTTP 200: the image is made, without SSR
    error = ssr_error(result)
    assert error.startswith(f"{field_name}:") or f" {field_name}:" in error, f"{case}: {error!r}"
    text = info(result)["infotexts"][0]
    assert "SSR error: " in text and "SSR scale" not in text and "SSR-Encoder: True" not in text
    assert np.array_equal(pixels(result), baseline["plain"])
    assert_clean(tiny_host, baseline["hooks"])


# ----------------------------------------------------------------------------- weight formats

@pytest.mark.parametrize("model", [pl.TINY_SSR, pl.OFFICIAL_PAIR, pl.REEXPORT_PAIR])
def test_weight_formats_load_in_the_webui_and_match_the_core_library(clean, model):
    """Loaded by the extension inside the WebUI (whose modules/safe.py replaced torch.load:
    the official .bin pair goes through it) and checked against the core library's encoding
    from the same files."""
    host = clean
    assert torch.load.__module__ == "modules.safe", "the WebUI's safe loader is not in place"
    runtime(host).release()  # load from the files now, not from the cache
    result = recorded(host, "txt2img", pl.ssr_unit(subject_dict(0), model=model))
    verified(host, result, expectation(host, [core_subject(0)], model=model))
    params = info(result)["extra_generation_params"]
    assert params["SSR model"] == model and len(params["SSR model hash"]) == 8


# ----------------------------------------------------------------------------- broken weight files

class NotATensor:
    """Pickled into a .bin file: neither the WebUI's safe loader nor the extension accept it."""


@pytest.fixture
def own_ssr_folder(host):
    """The session's models/ssr_encoder as a folder of its own (the data dir links the cached
    folder; files written for a test must not land in the cache). Yields a function writing a
    file there; everything written is removed afterwards."""
    if os.path.islink(SSR_DIR):
        target = os.path.realpath(SSR_DIR)
        os.unlink(SSR_DIR)
        os.mkdir(SSR_DIR)
        for entry in os.listdir(target):
            os.symlink(os.path.join(target, entry), os.path.join(SSR_DIR, entry))
    written = []

    def write(name, data=None, tensors=None):
        path = os.path.join(SSR_DIR, name)
        top = os.path.join(SSR_DIR, name.split("/")[0])
        if top not in written:
            written.append(top)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if tensors is not None:
            torch.save(tensors, path)
        else:
            with open(path, "wb") as f:
                f.write(data)
        return path

    yield write
    for top in written:
        shutil.rmtree(top) if os.path.isdir(top) else os.remove(top)


def _tiny_ssr_bytes():
    with open(os.path.join(SSR_DIR, pl.TINY_SSR), "rb") as f:
        return f.read()


def test_broken_weight_files_are_reported(tiny_host, baseline, own_ssr_folder):
    host = tiny_host
    data = _tiny_ssr_bytes()
    own_ssr_folder("broken/truncated.safetensors", data[: len(data) // 3])
    own_ssr_folder("broken/garbage.bin", np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    own_ssr_folder("broken/custom.bin", tensors={"encoder.to_q.weight": torch.zeros(4, 768), "extra": NotATensor()})
    for name in ("broken/truncated.safetensors", "broken/garbage.bin", "broken/custom.bin"):
        result = generate(host, unit=pl.ssr_unit(subject_dict(0), model=name))
        error = ssr_error(result)
        assert error.startswith("model:") and os.path.basename(name) in error, f"{name}: {error!r}"
        assert "NoneType" not in error and MODELS not in error, error
        assert np.array_equal(pixels(result), baseline["plain"])
        if name.endswith("custom.bin"):
            assert "NotATensor" in error and "safetensors" in error, error
        assert_clean(host, baseline["hooks"])
    # not offered; listed under "ignored" with the reason
    listing = host.client.get("/ssr/models").json()
    assert not [m["name"] for m in listing["ssr_models"] if "broken/" in m["name"]]
    ignored = {i["file"]: i["reason"] for i in listing["ignored"]}
    assert {"ssr_encoder/broken/truncated.safetensors", "ssr_encoder/broken/garbage.bin",
            "ssr_encoder/broken/custom.bin"} <= set(ignored), ignored


def test_a_pickle_the_webui_safe_loader_refuses(tiny_host, baseline, own_ssr_folder):
    """An official pair whose aligner file also holds a bool tensor: the extension's header
    scan accepts it (tensors only), the WebUI's torch.load replacement refuses it (BoolStorage
    is not on its list) and returns None; the user must learn what the file is and what to do."""
    host = tiny_host
    from modules import safe

    official = os.path.join(SSR_DIR, pl.OFFICIAL_PAIR)
    aligner = safe.unsafe_torch_load(official, map_location="cpu", weights_only=True)
    aligner["flag"] = torch.zeros(3, dtype=torch.bool)
    own_ssr_folder("refused/pytorch_model.bin", tensors=aligner)
    with open(os.path.join(os.path.dirname(official), "pytorch_model_1.bin"), "rb") as f:
        own_ssr_folder("refused/pytorch_model_1.bin", f.read())
    result = generate(host, unit=pl.ssr_unit(subject_dict(0), model="refused/pytorch_model.bin"))
    error = ssr_error(result)
    assert "pytorch_model.bin" in error and "NoneType" not in error, error
    assert "safe loader" in error and ".safetensors" in error, error
    assert np.array_equal(pixels(result), baseline["plain"])
    assert_clean(host, baseline["hooks"])


# ----------------------------------------------------------------------------- checkpoint switch

def test_checkpoint_switch(host, baseline):
    """tiny -> full -> tiny, with SSR on each; tiny SSR weights on the full checkpoint are
    refused naming the widths."""
    from conftest import FULL_CKPT, TINY_CKPT

    host.load_checkpoint(TINY_CKPT)
    unit = pl.ssr_unit(subject_dict(0))
    tiny_before = pixels(generate(host, unit=unit))
    try:
        host.load_checkpoint(FULL_CKPT)
        full_hooks = hook_count(host.unet)
        full_plain = pixels(generate(host, steps=2))
        result = recorded(host, "txt2img", pl.ssr_unit(subject_dict(0), model=pl.FULL_SSR), steps=2)
        verified(host, result, expectation(host, [core_subject(0)], model=pl.FULL_SSR))
        assert hook_count(host.unet) == full_hooks and runtime(host).active is None
        wrong = generate(host, unit=unit, steps=2)
        error = ssr_error(wrong)
        assert "wide" in error or "width" in error, error
        assert error.startswith(f"model {pl.TINY_SSR}: "), error  # names the field and the file that does not fit
        assert np.array_equal(pixels(wrong), full_plain)
        assert hook_count(host.unet) == full_hooks
    finally:
        host.load_checkpoint(TINY_CKPT)
    assert np.array_equal(pixels(generate(host, unit=unit)), tiny_before)
    assert_clean(host, baseline["hooks"])
    assert np.array_equal(pixels(generate(host)), baseline["plain"])
