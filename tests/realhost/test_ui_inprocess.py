"""The accordion's side, in the real WebUI v1.10.1 (gradio 3.41.2): the controls and the
positional argument order, the script-info the API publishes, the UI's own value types
(PIL images, the sketch tool's {"image", "mask"}) through the real script runner against
the API's dict and positional forms, the infotext round trip through the WebUI's own parser
and paste code back into the controls (and from them to the same image), and the Preview
button against the core library."""
from __future__ import annotations

import numpy as np
import pytest

import payloads as pl
from test_generation import MASK, PROMPT, assert_clean, baseline, core_embedder, generate, info, pixels, \
    subject_dict  # noqa: F401  (baseline: fixture)

SCALE, START, END = 0.7, 0.1, 0.9


def _script(host, runner=None):
    runner = runner or host.scripts.scripts_txt2img
    found = [s for s in runner.alwayson_scripts if s.title() == pl.TITLE]
    assert len(found) == 1, [s.title() for s in runner.alwayson_scripts]
    return found[0]


def _build_ui(script):
    import gradio as gr

    with gr.Blocks() as demo:
        controls = script.ui(False)
    return demo, controls


# ----------------------------------------------------------------------------- controls

def test_controls_match_the_positional_order(tiny_host):
    from ssr_webui import settings
    from ssr_webui.request import GLOBAL_FIELDS, SLOT_FIELDS, parse_script_args

    script = _script(tiny_host)
    for _ in range(2):  # the API builds the UI again, inside a fresh Blocks, to read defaults
        _, controls = _build_ui(script)
        slots = settings.slot_count()
        assert len(controls) == len(GLOBAL_FIELDS) + len(SLOT_FIELDS) * slots
    enabled, scale, start, end, model, clip = controls[:6]
    assert enabled.value is False and (scale.value, start.value, end.value) == (0.65, 0.0, 1.0)
    assert pl.TINY_SSR in model.choices and pl.OFFICIAL_PAIR in model.choices and pl.REEXPORT_PAIR in model.choices
    assert clip.value == pl.CLIP
    image, query, weight, mask_weight = controls[6:10]
    assert image.tool == "sketch" and query.label == "Subject 1 query"
    assert (weight.label, mask_weight.label) == ("Subject 1 weight", "Subject 1 mask strength")
    labels = [c.label for c in controls]
    assert all(labels) and len(set(labels)) == len(labels)
    assert not parse_script_args([c.value for c in controls]).enabled  # the UI's defaults: a valid, disabled request
    assert script.args_to - script.args_from == len(controls)


def test_script_info_over_the_api(tiny_host):
    entries = tiny_host.client.get("/sdapi/v1/script-info").json()
    ours = [e for e in entries if e["name"] == pl.TITLE.lower() and not e["is_img2img"]]
    assert len(ours) == 1 and ours[0]["is_alwayson"]
    args = {a["label"]: a for a in ours[0]["args"]}
    scale = args["Subject scale (lambda)"]
    assert (scale["minimum"], scale["maximum"], scale["value"]) == (0.0, 2.0, 0.65)
    assert pl.TINY_SSR in args["SSR weights (models/ssr_encoder)"]["choices"]


# ----------------------------------------------------------------------------- the three argument forms

def _run_in_process(host, ui_values, **fields):
    """What the UI's Generate does, without gradio's transport: the real StableDiffusionProcessing,
    script runner and process_images, with the script's slice of the arguments as the UI's
    controls hand them over (PIL images, the sketch tool's {"image", "mask"})."""
    from contextlib import closing

    from modules import processing, shared
    from modules.processing import StableDiffusionProcessingTxt2Img

    runner = host.scripts.scripts_txt2img
    script = _script(host, runner)
    args = host.api.init_default_script_args(runner)
    values = list(ui_values) + [None, "", 1.0, 5.0] * ((script.args_to - script.args_from - len(ui_values)) // 4)
    args[script.args_from:script.args_to] = values
    # in the UI, steps, sampler and seed are script controls too (set on p by their scripts' setup())
    for other in runner.alwayson_scripts:
        if other.title() == "Sampler":
            args[other.args_from:other.args_from + 3] = [fields.pop("steps", 3), "Euler", "Automatic"]
        elif other.title() == "Seed":
            args[other.args_from] = 1234
    settings = dict(PROMPT, width=64, height=64, cfg_scale=5.0, do_not_save_samples=True, do_not_save_grid=True)
    settings.update(fields)
    p = StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, **settings)
    p.scripts = runner
    p.script_args = tuple(args)  # runs the scripts' setup(), as for the UI (p.is_api is False)
    shared.state.begin(job="test")
    try:
        with closing(p):
            processed = processing.process_images(p)
    finally:
        shared.state.end()
    return np.stack([np.asarray(im.convert("RGB")) for im in processed.images]), processed


def test_ui_values_positional_api_and_dict_api_give_the_same_image(tiny_host, baseline):
    """A mask subject (sketch) and a text subject, three ways: the UI's values through the
    script runner in-process, the same list positionally over the API, and the dict form."""
    host = tiny_host
    image_2, image_1 = pl.reference_image(2), pl.reference_image(1)
    ui_values = [True, SCALE, START, END, pl.TINY_SSR, pl.CLIP,
                 {"image": image_2, "mask": MASK.convert("RGB")}, "", 0.8, 4.0,
                 image_1, "the blue thing", 1.2, 5.0]
    in_process, processed = _run_in_process(host, ui_values)
    plain_in_process, plain_processed = _run_in_process(host, [False])
    assert np.array_equal(plain_in_process, baseline["plain"]), plain_processed.infotexts[0]  # the same settings as the API's
    assert "SSR 1 mode: mask" in processed.infotexts[0] and "SSR error" not in processed.infotexts[0]
    assert_clean(host, baseline["hooks"])

    positional = list(ui_values)
    positional[6] = {"image": pl.encode(image_2), "mask": pl.encode(MASK)}
    positional[10] = pl.encode(image_1)
    over_api = generate(host, unit=None, alwayson_scripts={pl.TITLE: {"args": positional}})
    unit = pl.ssr_unit(subject_dict(2, "", mask=MASK, weight=0.8, mask_weight=4.0),
                       subject_dict(1, "the blue thing", weight=1.2), scale=SCALE, start=START, end=END)
    as_dict = generate(host, unit=unit)
    for result in (over_api, as_dict):
        assert "SSR error" not in result["info"], result["info"]
    assert not np.array_equal(in_process, baseline["plain"])
    assert np.array_equal(pixels(over_api), in_process)
    assert np.array_equal(pixels(as_dict), in_process)
    assert info(over_api)["infotexts"][0] == info(as_dict)["infotexts"][0] == processed.infotexts[0]
    assert_clean(host, baseline["hooks"])


# ----------------------------------------------------------------------------- infotext round trip

def _paste(script, text):
    """The WebUI's own "paste generation parameters" for the script's infotext fields: its
    connect_paste, on fresh controls, and the function it registers called with ``text``.
    -> (controls, {control index: pasted value})."""
    import gradio as gr
    from modules import infotext_utils

    with gr.Blocks() as demo:
        controls = script.ui(False)
        fields = script.infotext_fields
        source, button = gr.Textbox(), gr.Button()
        infotext_utils.connect_paste(button, fields, source, None, "txt2img")
    paste = [f.fn for f in demo.fns if getattr(f.fn, "__name__", "") == "paste_func"]
    assert len(paste) == 1
    updates = paste[0](text)
    index = {id(c): i for i, c in enumerate(controls)}
    pasted = {}
    for (component, _), update in zip(fields, updates):
        assert id(component) in index, "an infotext field is not one of the script's controls"
        if "value" in update:
            pasted[index[id(component)]] = update["value"]
    return controls, pasted


def test_infotext_round_trip(tiny_host, baseline):
    from modules import infotext_utils

    host = tiny_host
    query = 'the "red" dog, small: really'
    unit = pl.ssr_unit(subject_dict(0, query, weight=1.25),
                       subject_dict(2, "", mask=MASK, weight=0.5, mask_weight=7.5),
                       scale=0.55, start=0.1, end=0.8, model=pl.OFFICIAL_PAIR)
    result = generate(host, unit=unit)
    text = info(result)["infotexts"][0]
    assert "SSR error" not in text, text
    params = infotext_utils.parse_generation_parameters(text)
    expected_params = {"SSR-Encoder": "True", "SSR scale": "0.55", "SSR start": "0.1", "SSR end": "0.8",
                       "SSR model": pl.OFFICIAL_PAIR, "SSR CLIP": pl.CLIP, "SSR 1 mode": "text", "SSR 1 query": query,
                       "SSR 1 weight": "1.25", "SSR 2 mode": "mask", "SSR 2 weight": "0.5", "SSR 2 mask weight": "7.5"}
    assert {k: params.get(k) for k in expected_params} == expected_params
    assert len(params["SSR model hash"]) == 8 and "SSR 2 query" not in params

    script = _script(host)
    controls, pasted = _paste(script, text)
    assert pasted == {0: True, 1: 0.55, 2: 0.1, 3: 0.8, 4: pl.OFFICIAL_PAIR, 5: pl.CLIP,
                      7: query, 8: 1.25, 12: 0.5, 13: 7.5}
    assert {key for _, key in script.infotext_fields} <= set(script.paste_field_names)
    # the restored controls, with the images put back, make the same image
    values = [c.value for c in controls]
    for i, v in pasted.items():
        values[i] = v
    values[6] = pl.encode(pl.reference_image(0))
    values[10] = {"image": pl.encode(pl.reference_image(2)), "mask": pl.encode(MASK)}
    again = generate(host, alwayson_scripts={pl.TITLE: {"args": values}})
    assert "SSR error" not in again["info"], again["info"]
    assert not np.array_equal(pixels(result), baseline["plain"])
    assert np.array_equal(pixels(again), pixels(result))


def test_not_applied_infotext_pastes_the_settings_back(tiny_host):
    """"SSR-Encoder: not applied (...)" still enables the accordion with the settings used."""
    host = tiny_host
    result = generate(host, unit=pl.ssr_unit(subject_dict(0), start=0.9, end=1.0))
    text = info(result)["infotexts"][0]
    assert "SSR-Encoder: not applied" in text, text
    _, pasted = _paste(_script(host), text)
    assert pasted[0] is True and (pasted[2], pasted[3]) == (0.9, 1.0) and pasted[7] == "the red thing"


# ----------------------------------------------------------------------------- preview

def test_preview_button_against_the_core_library(tiny_host, baseline):
    from ssr_webui import ui

    host = tiny_host
    image = pl.reference_image(1)
    slots = [image, "the blue thing", 1.0, 5.0, {"image": pl.reference_image(2), "mask": MASK.convert("RGB")}, "", 1.0, 4.0,
             None, "", 1.0, 5.0]
    items, status = ui.preview_slots(host.script.runtime, pl.TINY_SSR, pl.CLIP, slots)
    assert status == ""
    assert [caption for _, caption in items] == ["Subject 1: text query 'the blue thing'", "Subject 2: mask query"]
    # the overlay shows the core library's token-to-patch map of that query
    import ssr
    import torch

    with torch.no_grad():
        heatmap, _ = core_embedder(host).preview(ssr.Subject(image, "the blue thing"))
    want = np.asarray(ui.heatmap_overlay(image, heatmap), np.int16)
    assert np.abs(np.asarray(items[0][0], np.int16) - want).max() <= 1
    items, status = ui.preview_slots(host.script.runtime, pl.TINY_SSR, pl.CLIP, [None, "a dog", 1.0, 5.0])
    assert items == [] and "Subject 1" in status
    assert_clean(host, baseline["hooks"])
