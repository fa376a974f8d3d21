"""Issue 9, item 4, as pure functions (no WebUI): which sampling steps the start/end window
covers, decided before sampling from the step counts; the infotext says "not applied" and
why when it covers none; empty values are left out and the rest still pastes back.

The infotext line is written and read back here by the WebUI's documented format: a line of
``key: value`` pairs separated by ", ", a value holding ',', ':' or a newline JSON-quoted; on
paste each control's key, when present, is converted to the control's value type (a bool
control is False only for "False"), and a key that is absent leaves its control unchanged.
"""
from __future__ import annotations

import base64
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ssr_webui import infotext
from ssr_webui.request import parse_script_args
from ssr_webui.session import (denoiser_total_steps, sampling_passes, step_fraction, steps_in_window,
                               window_not_applied_reason)


# ----------------------------------------------------------------------------- the window

def on_steps(start, end, total):
    """The steps the session switches the branch on for, through the session's own test."""
    on = []
    for k in range(total):
        params = SimpleNamespace(denoiser=SimpleNamespace(step=k, total_steps=total), sampling_step=0,
                                 total_sampling_steps=total)
        if start <= step_fraction(params) < end:
            on.append(k)
    return on


@pytest.mark.parametrize("start,end,total", [(0.95, 1.0, 5), (0.0, 1.0, 5), (0.3, 0.7, 10), (0.8, 1.0, 5),
                                             (0.81, 1.0, 5), (0.0, 0.01, 20), (0.5, 0.55, 10), (0.85, 1.0, 10)])
def test_steps_in_window_counts_what_the_session_switches_on(start, end, total):
    assert steps_in_window(start, end, total) == len(on_steps(start, end, total))


def test_window_examples():
    assert steps_in_window(0.95, 1.0, 5) == 0  # steps at 0, 0.2, ..., 0.8
    assert steps_in_window(0.8, 1.0, 5) == 1
    assert steps_in_window(0.3, 0.7, 10) == 4  # 0.3, 0.4, 0.5, 0.6


def test_denoiser_total_steps():
    assert denoiser_total_steps(5) == 5
    assert denoiser_total_steps(5, second_order=True) == 10  # Heun, DPM2, DPM++ SDE: two calls a step
    assert denoiser_total_steps(20, denoising_strength=0.75) == 16  # img2img: int(0.75 * 20) + 1
    assert denoiser_total_steps(20, denoising_strength=1.0) == 20  # strength capped at 0.999
    assert denoiser_total_steps(20, denoising_strength=0.75, fix_steps=True) == 20
    assert denoiser_total_steps(20, second_order=True, denoising_strength=0.5) == 22


def test_sampling_passes_of_txt2img_hires_and_img2img():
    txt2img = SimpleNamespace(steps=5, sampler_name="Euler", enable_hr=False, denoising_strength=0.7)
    assert sampling_passes(txt2img) == [("first pass", 5, 5)]
    hires = SimpleNamespace(steps=5, sampler_name="Euler", enable_hr=True, hr_second_pass_steps=0,
                            hr_sampler_name="Use same sampler", denoising_strength=0.7)
    assert sampling_passes(hires) == [("first pass", 5, 5), ("hires pass", 5, 4)]
    hires.hr_second_pass_steps, hires.hr_sampler_name = 20, "Heun"
    assert sampling_passes(hires, second_order=lambda name: name == "Heun") == [("first pass", 5, 5), ("hires pass", 20, 30)]
    img2img = SimpleNamespace(steps=20, sampler_name="Euler", init_images=[None], denoising_strength=0.5, enable_hr=True)
    assert sampling_passes(img2img) == [("img2img", 20, 11)]  # no hires pass in img2img
    assert sampling_passes(img2img, fix_steps=True) == [("img2img", 20, 20)]


def test_not_applied_reason():
    assert window_not_applied_reason(0.95, 1.0, [("first pass", 5, 5)]) == \
        "start/end window 0.95-1 covers no sampling step of 5"
    assert window_not_applied_reason(0.95, 1.0, [("first pass", 5, 5), ("hires pass", 20, 15)]) == \
        "start/end window 0.95-1 covers no sampling step of 5 or 20 (hires pass)"
    assert window_not_applied_reason(0.0, 1.0, [("first pass", 5, 5)]) is None
    assert window_not_applied_reason(0.95, 1.0, [("first pass", 5, 5), ("hires pass", 30, 30)]) is None  # 29/30
    assert window_not_applied_reason(0.85, 1.0, [("first pass", 5, 10)]) is None  # second order: 9/10 = 0.9


# ----------------------------------------------------------------------------- the infotext

def png_b64(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mask_b64(w=64, h=48):
    a = np.zeros((h, w), np.uint8)
    a[10:30, 10:40] = 255
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request(**overrides):
    args = {"scale": 0.55, "start": 0.1, "end": 0.8, "subjects": [
        {"image": png_b64(), "query": 'the "red" dog, small', "weight": 1.25},
        {"image": png_b64(seed=1), "mask": mask_b64(), "weight": 0.5, "mask_weight": 7.5}]}
    args.update(overrides)
    return parse_script_args([args])


def write_line(params):
    """A generation-parameters line as the WebUI writes it."""
    def quote(value):
        text = str(value)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    return "Steps: 20, Sampler: Euler, " + ", ".join(f"{k}: {quote(v)}" for k, v in params.items())


def read_line(line):
    """The line back into {key: text}: a JSON-quoted value or text up to the next ', '."""
    found, pos = {}, 0
    pair = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
    while pos < len(line):
        m = pair.match(line, pos)
        assert m, line[pos:]
        value = m.group(2)
        found[m.group(1)] = json.loads(value) if value.startswith('"') and value.endswith('"') and len(value) > 1 else value
        pos = m.end()
    return found


CONTROL_TYPES = {infotext.ENABLED: bool, infotext.SCALE: float, infotext.START: float, infotext.END: float,
                 infotext.MODEL: str, infotext.CLIP: str}


def paste(params, slots=2):
    """{key: text} -> {key: control value} for the keys the UI restores (absent: unchanged)."""
    types = dict(CONTROL_TYPES)
    for slot in range(slots):
        query, weight, mask_weight = infotext.slot_keys(slot)
        types.update({query: str, weight: float, mask_weight: float})
    out = {}
    for key, kind in types.items():
        if key in params:
            text = params[key]
            out[key] = (text != "False") if kind is bool else kind(text)
    return out


def test_mask_only_subject_writes_no_empty_query():
    params = infotext.generation_params(request(), "ssr.safetensors", "1a2b3c4d", "clip_vision/vit")
    assert infotext.subject_key(1, "query") not in params  # was 'SSR 2 query: ""'
    assert "" not in params.values() and '""' not in params.values()
    assert params[infotext.subject_key(1, "mode")] == "mask"
    assert params[infotext.subject_key(0, "query")] == 'the "red" dog, small'
    assert params[infotext.ENABLED] is True


def test_round_trip_restores_every_written_field():
    params = infotext.generation_params(request(), "ssr.safetensors", "1a2b3c4d", "clip_vision/vit")
    restored = paste(read_line(write_line(params)))
    assert restored == {
        infotext.ENABLED: True, infotext.SCALE: 0.55, infotext.START: 0.1, infotext.END: 0.8,
        infotext.MODEL: "ssr.safetensors", infotext.CLIP: "clip_vision/vit",
        "SSR 1 query": 'the "red" dog, small', "SSR 1 weight": 1.25,
        "SSR 2 weight": 0.5, "SSR 2 mask weight": 7.5,  # no "SSR 2 query": the query box is left as it is
    }


def test_not_applied_is_written_with_its_reason_and_still_pastes_the_settings():
    reason = window_not_applied_reason(0.95, 1.0, [("first pass", 5, 5)])
    params = infotext.generation_params(request(start=0.95, end=1.0), "ssr.safetensors", None, "clip_vision/vit",
                                        not_applied=reason)
    assert params[infotext.ENABLED] == "not applied (start/end window 0.95-1 covers no sampling step of 5)"
    assert infotext.MODEL_HASH not in params  # nothing was loaded, so no hash
    line = write_line(params)
    assert "SSR-Encoder: not applied (start/end window 0.95-1 covers no sampling step of 5)," in line  # unquoted
    restored = paste(read_line(line))
    assert restored[infotext.ENABLED] is True and restored[infotext.START] == 0.95 and restored[infotext.END] == 1.0


# ----------------------------------------------------------------------------- decided in Script.process

class FakeP(SimpleNamespace):
    def comment(self, text):
        self.comments.append(text)


def fake_runtime(monkeypatch):
    from ssr_webui import runtime as rt
    from ssr_webui.model_files import ModelFile

    runtime = rt.SSRRuntime()
    files = {"ssr": ModelFile("ssr.safetensors", "/nonexistent/ssr.safetensors", "ssr", ("/nonexistent/ssr.safetensors",)),
             "clip": ModelFile("clip_vision/vit", "/nonexistent/vit", "clip", ("/nonexistent/vit/model.safetensors",))}
    monkeypatch.setattr(runtime, "list_models", lambda: None)
    monkeypatch.setattr(runtime, "resolve", lambda listing, kind, name, field: files[kind])

    def must_not_load(*args, **kwargs):
        raise AssertionError("nothing should be loaded for a generation SSR-Encoder cannot act on")

    monkeypatch.setattr(runtime, "ssr_weights", must_not_load)
    monkeypatch.setattr(runtime, "embedder", must_not_load)
    return runtime


@pytest.mark.parametrize("start,weights,reason", [
    (0.95, (1.0,), "start/end window 0.95-1 covers no sampling step of 5"),
    (0.0, (0.0, 0.0), "every subject's weight is 0"),
])
def test_start_generation_says_not_applied_before_sampling(monkeypatch, capsys, start, weights, reason):
    runtime = fake_runtime(monkeypatch)
    p = FakeP(steps=5, sampler_name="Euler", enable_hr=False, denoising_strength=None, extra_generation_params={},
              sd_model=None, is_api=True, comments=[])
    args = [True, 0.65, start, 1.0, None, None]
    for w in weights:
        args += [png_b64(), "the dog", w, 5.0]
    assert runtime.start_generation(p, args) is None
    assert p.extra_generation_params[infotext.ENABLED] == f"not applied ({reason})"
    assert infotext.ERROR not in p.extra_generation_params
    assert p.extra_generation_params[infotext.START] == f"{start:g}"  # the settings are kept
    assert p.comments == [f"SSR-Encoder was not applied: {reason}"]
    assert reason in capsys.readouterr().err
    processed = SimpleNamespace(comments="")
    runtime.finish_generation(p, processed)
    assert f"SSR-Encoder was not applied: {reason}" in processed.comments
