"""API dict / positional argument parsing: accepted forms and every named error."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from ssr_webui import request as rq
from ssr_webui.request import ArgumentError, parse_script_args


def png_b64(image, data_url=False):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


def photo(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def mask_image(w=64, h=48, box=(10, 10, 40, 30)):
    a = np.zeros((h, w), np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(a)


def api_args(**overrides):
    args = {"enabled": True, "scale": 0.5, "start": 0.1, "end": 0.9, "model": "m.safetensors", "clip_model": "c",
            "subjects": [{"image": png_b64(photo()), "query": "the dog", "weight": 1.5},
                         {"image": png_b64(photo(seed=1), data_url=True), "mask": png_b64(mask_image()), "mask_weight": 2}]}
    args.update(overrides)
    return [args, None, None]  # positions after the dict keep ui() defaults


def test_api_dict_form():
    r = parse_script_args(api_args())
    assert (r.enabled, r.scale, r.start, r.end, r.model, r.clip_model, r.form) == (True, 0.5, 0.1, 0.9, "m.safetensors", "c", "dict")
    a, b = r.subjects
    assert (a.mode, a.query, a.weight, a.mask_weight, a.slot) == ("text", "the dog", 1.5, 5.0, 0)
    assert a.image.size == (64, 48)
    assert (b.mode, b.query, b.mask_weight, b.slot) == ("mask", "", 2.0, 1)
    assert b.mask.shape == (48, 64) and b.mask[20, 20] == 1.0 and b.mask[0, 0] == 0.0


def test_api_dict_defaults_and_disabled():
    r = parse_script_args([{"subjects": [{"image": png_b64(photo()), "query": "a cat"}]}])
    assert (r.enabled, r.scale, r.start, r.end, r.model, r.clip_model) == (True, 0.65, 0.0, 1.0, None, None)
    assert not parse_script_args([{"enabled": False, "subjects": "ignored when disabled"}]).enabled


def test_positional_ui_form_with_sketch_dicts():
    sketch_empty = {"image": photo(), "mask": Image.new("RGB", (64, 48))}  # no stroke: all black -> text mode
    sketch_drawn = {"image": photo(seed=2), "mask": mask_image().convert("RGB")}
    args = [True, 0.65, 0.0, 1.0, "m", "c",
            sketch_empty, "the dog", 1.0, 5.0,
            None, "", 1.0, 5.0,  # empty slot
            sketch_drawn, "", 0.5, 3.0]
    r = parse_script_args(args)
    assert [s.slot for s in r.subjects] == [0, 2]
    assert [s.mode for s in r.subjects] == ["text", "mask"]
    assert r.subjects[1].weight == 0.5 and r.subjects[1].mask_weight == 3.0
    assert r.form == "positional"


def test_positional_api_form_with_base64_and_disabled_default():
    args = [True, 0.7, 0.0, 1.0, None, None, png_b64(photo()), "a hat", 1.0, 5.0]
    assert parse_script_args(args).subjects[0].query == "a hat"
    assert not parse_script_args([False, 0.65, 0.0, 1.0, None, None, None, "", 1.0, 5.0]).enabled
    assert not parse_script_args([]).enabled


def test_numpy_image_from_gradio():
    r = parse_script_args([True, 0.65, 0, 1, None, None, np.asarray(photo()), "x", 1, 5])
    assert r.subjects[0].image.size == (64, 48)


BAD = png_b64(photo())
ERROR_CASES = [
    # (args[0] dict, field named in the error, words in the message)
    ({"enabled": "yes"}, "enabled", "true or false"),
    ({"scale": "0.6"}, "scale", "expected a number"),
    ({"scale": 3.0}, "scale", "out of range"),
    ({"scale": float("nan")}, "scale", "out of range"),
    ({"start": -0.1}, "start", "out of range"),
    ({"end": True}, "end", "expected a number"),
    ({"start": 0.6, "end": 0.5}, "end", "greater than start"),
    ({"model": 3}, "model", "file name"),
    ({"clip_model": ["x"]}, "clip_model", "file name"),
    ({"scael": 0.5}, "args[0]", "unknown keys ['scael']"),
    ({"subjects": "x"}, "subjects", "list"),
    ({"subjects": []}, "subjects", "no subject"),
    ({"subjects": [{"image": BAD, "query": "q"}] * 9}, "subjects", "at most 8"),
    ({"subjects": ["x"]}, "subjects[0]", "expected an object"),
    ({"subjects": [{"image": BAD, "qeury": "q"}]}, "subjects[0]", "unknown keys ['qeury']"),
    ({"subjects": [{"query": "q"}]}, "subjects[0].image", "missing"),
    ({"subjects": [{"image": "not base64 !!", "query": "q"}]}, "subjects[0].image", "not valid base64"),
    ({"subjects": [{"image": base64.b64encode(b"hello world").decode(), "query": "q"}]}, "subjects[0].image", "not a decodable image"),
    ({"subjects": [{"image": "https://example.com/a.png", "query": "q"}]}, "subjects[0].image", "URLs"),
    ({"subjects": [{"image": 5, "query": "q"}]}, "subjects[0].image", "base64"),
    ({"subjects": [{"image": {"image": BAD, "maks": BAD}, "query": "q"}]}, "subjects[0].image", "unknown keys"),
    ({"subjects": [{"image": BAD}]}, "subjects[0].query", "query text"),
    ({"subjects": [{"image": BAD, "query": 7}]}, "subjects[0].query", "expected a string"),
    ({"subjects": [{"image": BAD, "query": "x" * 1001}]}, "subjects[0].query", "at most 1000"),
    ({"subjects": [{"image": BAD, "query": "q", "weight": 2.5}]}, "subjects[0].weight", "out of range"),
    ({"subjects": [{"image": BAD, "query": "q", "mask_weight": -1}]}, "subjects[0].mask_weight", "out of range"),
    ({"subjects": [{"image": BAD, "mask": png_b64(Image.new("L", (64, 48)))}]}, "subjects[0].mask", "empty"),
    ({"subjects": [{"image": BAD, "mask": png_b64(mask_image(48, 64))}]}, "subjects[0].mask", "aspect ratio"),
    ({"subjects": [{"image": BAD, "mask": "!!"}]}, "subjects[0].mask", "not valid base64"),
]


@pytest.mark.parametrize("overrides,field,words", ERROR_CASES, ids=[f"{c[1]}-{c[2][:20]}" for c in ERROR_CASES])
def test_api_errors_name_the_field(overrides, field, words):
    with pytest.raises(ArgumentError) as info:
        parse_script_args(api_args(**overrides))
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")
    assert words in str(info.value)


def test_size_limits(monkeypatch):
    monkeypatch.setattr(rq, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ArgumentError, match=r"subjects\[0\]\.image: image is 64x48"):
        parse_script_args(api_args(subjects=[{"image": BAD, "query": "q"}]))
    monkeypatch.setattr(rq, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(ArgumentError, match=r"subjects\[0\]\.image: image data is larger"):
        parse_script_args(api_args(subjects=[{"image": BAD, "query": "q"}]))


POSITIONAL_ERRORS = [
    ([1, 0.65, 0, 1, None, None], r"args\[0\] \(enabled\)"),
    ([True, 5, 0, 1, None, None, BAD, "q", 1, 5], r"args\[1\] \(scale\)"),
    ([True, 0.65, 0, 1, None, None, BAD, "q", 1], "4 per subject slot"),
    ([True, 0.65, 0, 1, None, None, None, "q", 1, 5], r"args\[6\.\.9\] subjects\[0\]\.image: a query"),
    ([True, 0.65, 0, 1, None, None, BAD, "q", 9, 5], r"args\[6\.\.9\] subjects\[0\]\.weight"),
    ([True, 0.65, 0, 1, None, None, None, "", 1, 5], "subjects: no subject"),
]


@pytest.mark.parametrize("args,pattern", POSITIONAL_ERRORS)
def test_positional_errors_name_the_position(args, pattern):
    with pytest.raises(ArgumentError, match=pattern):
        parse_script_args(args)
