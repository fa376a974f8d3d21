"""The accordion under gradio 3.41.2: builds repeatedly, readable script-info, settings, preview button."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
import torch

import ssr
from ssr_webui import settings, ui
from ssr_webui.request import parse_script_args

from ssr_webui_testenv import CLIP, SINGLE, TITLE, box_mask, reference_image, shared


def test_gradio_is_the_webui_pin():
    assert gr.__version__ == "3.41.2"


def test_ui_builds_repeatedly_and_matches_the_argument_order(webui):
    script = webui.txt2img.script(TITLE)
    assert len(script.controls) == 6 + 4 * 3
    for _ in range(3):  # the API calls ui() again, inside a fresh Blocks, to read defaults
        with gr.Blocks():
            controls = script.ui(False)
        assert [type(c).__name__ for c in controls] == [type(c).__name__ for c in script.controls]
    accordion, scale, start, end, model, clip = script.controls[:6]
    assert accordion.value is False and scale.value == 0.65 and (start.value, end.value) == (0.0, 1.0)
    assert model.value == "official/pytorch_model.bin" and SINGLE in model.choices and clip.value == CLIP
    image = script.controls[6]
    assert image.tool == "sketch" and image.source == "upload"
    labels = [c.label for c in script.controls]
    assert all(labels) and len(set(labels)) == len(labels)
    defaults = [c.value for c in script.controls]
    assert not parse_script_args(defaults).enabled  # the UI's defaults are a valid, disabled request


def test_script_info_is_readable(webui):
    info = webui.txt2img.script(TITLE).api_info
    args = {a.label: a for a in info.args}
    assert info.name == TITLE.lower() and info.is_alwayson
    assert (args["Subject scale (lambda)"].minimum, args["Subject scale (lambda)"].maximum) == (0.0, 2.0)
    assert args["Start at (fraction of steps)"].maximum == 1.0
    assert SINGLE in args["SSR weights (models/ssr_encoder)"].choices
    assert args["Subject 2 query"].value == "" and args["Subject 3 mask strength"].value == 5.0


def test_settings_registered_and_slot_count(webui, monkeypatch):
    labels = shared.opts.data_labels
    for key in (settings.SLOTS, settings.CLIP_PLACEMENT, settings.SUBJECT_CACHE):
        assert labels[key].section[0] == "ssr_encoder"
    monkeypatch.setitem(shared.opts.data, settings.SLOTS, 2)
    with gr.Blocks():
        controls = webui.txt2img.script(TITLE).ui(False)
    assert len(controls) == 6 + 4 * 2
    monkeypatch.setitem(shared.opts.data, settings.CLIP_PLACEMENT, "bogus")
    assert settings.clip_placement() == settings.PLACE_OFFLOAD


def test_preview_button_shows_each_slot(webui, core_embedder):
    image, mask = reference_image(1), box_mask()
    slots = [image, "a dog", 1.0, 5.0, {"image": image, "mask": mask}, "", 1.0, 4.0, None, "", 1.0, 5.0]
    items, status = ui.preview_slots(webui.runtime, SINGLE, CLIP, slots)
    assert status == ""
    assert [caption for _, caption in items] == ["Subject 1: text query 'a dog'", "Subject 2: mask query"]
    assert all(overlay.size == (336, 336) for overlay, _ in items)
    # the overlay shows the core library's token-to-patch map of that query
    heatmap, _ = core_embedder.preview(ssr.Subject(image, "a dog"))
    expected = ui.heatmap_overlay(image, heatmap)
    assert np.abs(np.asarray(items[0][0], np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_preview_button_names_bad_slots(webui):
    slots = [None, "a dog", 1.0, 5.0]
    items, status = ui.preview_slots(webui.runtime, SINGLE, CLIP, slots)
    assert items == [] and "subject 1 image: a query or mask was given but no reference image" in status
    items, status = ui.preview_slots(webui.runtime, "nope", CLIP, [reference_image(1), "x", 1.0, 5.0])
    assert items == [] and "model: &#x27;nope&#x27; not found" in status
    items, status = ui.preview_slots(webui.runtime, SINGLE, CLIP, [None, "", 1.0, 5.0])
    assert "Add a reference image" in status


@pytest.mark.parametrize("placement", [settings.PLACE_OFFLOAD, settings.PLACE_GPU, settings.PLACE_CPU])
def test_clip_placement_setting_is_honoured(webui, monkeypatch, placement):
    """Module moves around an encoding, per setting (an accelerator is pretended; nothing really moves).
    A subject that is already cached moves nothing."""
    from modules import devices
    moves = []
    monkeypatch.setitem(shared.opts.data, settings.CLIP_PLACEMENT, placement)
    monkeypatch.setattr(devices, "device", torch.device("meta"))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append(torch.device(a[0]).type) or self)
    subject = parse_script_args([{"subjects": [{"image": reference_image(1), "query": f"a dog, {placement}"}]}]).subjects[0]
    webui.runtime.preview(subject, SINGLE, CLIP, webui.model)
    expected = {settings.PLACE_OFFLOAD: ["meta", "meta", "cpu", "cpu"], settings.PLACE_GPU: ["meta", "meta"],
                settings.PLACE_CPU: ["cpu", "cpu"]}[placement]
    assert moves == expected
    moves.clear()
    webui.runtime.preview(subject, SINGLE, CLIP, webui.model)
    assert moves == []
