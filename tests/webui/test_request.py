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
    ({"subjects": [{"image": "not base64 !!", "query": "q"}]}, "subjects[0].image", "not a base64 image or data URL"),
    ({"subjects": [{"image": base64.b64encode(b"hello world").decode(), "query": "q"}]}, "subjects[0].image",
     "not a base64 image or data URL"),
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
    ({"subjects": [{"image": BAD, "mask": "!!"}]}, "subjects[0].mask", "not a base64 image or data URL"),
    ({"subjects": [{"image": BAD, "mask": "/etc/passwd"}]}, "subjects[0].mask", "not a base64 image or data URL"),
    ({"subjects": [{"image": None, "query": "q"}]}, "subjects[0].image", "missing"),
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


POSITIONAL_ERRORS = [  # what only an API caller sending the positional list can get wrong
    ([1, 0.65, 0, 1, None, None], r"^SSR-Encoder: expected true or false"),
    ([True, 0.65, 0, 1, None, None, BAD, "q", 1], r"^args: 9 values; expected 6 \+ 4 per subject slot"),
]


@pytest.mark.parametrize("args,pattern", POSITIONAL_ERRORS)
def test_positional_errors(args, pattern):
    with pytest.raises(ArgumentError, match=pattern):
        parse_script_args(args)


# ----------------------------------------------------------------------------- image formats (issue 9, item 1)

def encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data, mime=None):
    text = base64.b64encode(data).decode()
    return f"data:{mime};base64,{text}" if mime else text


def smooth_rgb(w=64, h=48, seed=0):
    """Smooth colours (JPEG keeps them within a few levels)."""
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR))


def decode_reference(value):
    return parse_script_args([{"subjects": [{"image": value, "query": "q"}]}]).subjects[0].image


def decode_mask(value, image=None):
    image = image if image is not None else png_b64(photo())
    return parse_script_args([{"subjects": [{"image": image, "mask": value}]}]).subjects[0].mask


def test_jpeg_base64_starts_with_a_slash_and_is_accepted():
    rgb = smooth_rgb()
    data = encoded(Image.fromarray(rgb), "JPEG", quality=95)
    jpeg = b64(data)
    assert jpeg.startswith("/9j/")  # every JPEG's base64 does
    wrapped = "\n".join(jpeg[i:i + 76] for i in range(0, len(jpeg), 76))  # MIME line breaks
    for value in (jpeg, "data:image/jpeg;base64," + jpeg, "data:image/jpg;base64," + jpeg, "  " + jpeg + "\n", wrapped):
        image = decode_reference(value)
        assert image.mode == "RGB" and image.size == (64, 48)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        assert np.abs(np.asarray(image, np.int16) - rgb).mean() < 2  # JPEG loss only


def test_cmyk_jpeg_decodes_to_rgb():
    rgb = smooth_rgb(seed=1)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    image = decode_reference(b64(encoded(cmyk, "JPEG", quality=95)))
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, np.int16) - rgb).mean() < 3


def test_webp_png_palette_rgba_and_16_bit_grey_decode_to_rgb():
    rgb = smooth_rgb(seed=2)
    webp = decode_reference(b64(encoded(Image.fromarray(rgb), "WEBP", lossless=True), "image/webp"))
    assert webp.mode == "RGB" and np.array_equal(np.asarray(webp), rgb)

    palette = Image.fromarray(rgb).convert("P")
    decoded = decode_reference(b64(encoded(palette, "PNG")))
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(palette.convert("RGB")))

    alpha = np.linspace(0, 255, 64 * 48).reshape(48, 64).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    decoded = decode_reference(b64(encoded(rgba, "PNG"), "image/png"))
    a = alpha[..., None] / 255.0
    over_white = rgb * a + 255.0 * (1 - a)  # transparency is composited over white
    assert decoded.mode == "RGB" and np.abs(np.asarray(decoded) - over_white).max() <= 1.0

    grey16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    png16 = encoded(Image.fromarray(grey16, "I;16"), "PNG")
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")  # really a 16-bit file
    decoded = decode_reference(b64(png16))
    expected = np.round(grey16 / 257.0).astype(np.uint8)  # scaled to 8 bits, not clipped at 255
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.repeat(expected[..., None], 3, axis=2))


def box(w=64, h=48, value=255, dtype=np.uint8, background=0):
    a = np.full((h, w), background, dtype)
    a[8:32, 16:48] = value
    return a


def test_masks_in_every_format():
    selected = box() > 0
    cases = {
        "jpeg": b64(encoded(Image.fromarray(box()), "JPEG", quality=95)),
        "jpeg data url": b64(encoded(Image.fromarray(box()), "JPEG", quality=95), "image/jpeg"),
        "rgb jpeg": b64(encoded(Image.fromarray(box()).convert("RGB"), "JPEG", quality=95)),
        "cmyk jpeg": b64(encoded(Image.fromarray(box()).convert("RGB").convert("CMYK"), "JPEG", quality=95)),
        "webp": b64(encoded(Image.fromarray(box()), "WEBP", lossless=True)),
        "palette png": b64(encoded(Image.fromarray(box()).convert("P"), "PNG")),
        "16-bit png": b64(encoded(Image.fromarray(box(value=65535, dtype=np.uint16), "I;16"), "PNG")),
        # a sketch layer: white strokes, transparent elsewhere
        "rgba png": b64(encoded(Image.fromarray(np.dstack([np.full((48, 64, 3), 255, np.uint8), box()]), "RGBA"), "PNG")),
    }
    for name, value in cases.items():
        mask = decode_mask(value)
        assert mask.shape == (48, 64) and mask.dtype == np.float32, name
        assert np.array_equal(mask > 0.5, selected), name


def test_sixteen_bit_mask_is_scaled_not_clipped():
    """A 16-bit mask's grey 30000 is 0.46 (not selected), not 255 after clipping."""
    mask = box(value=65535, dtype=np.uint16, background=30000)
    decoded = decode_mask(b64(encoded(Image.fromarray(mask, "I;16"), "PNG")))
    assert np.allclose(decoded[0, 0], round(30000 / 257) / 255) and decoded[10, 20] == 1.0


NOT_IMAGES = [
    "/etc/passwd", "/9j/etc/passwd", "C:\\Users\\me\\dog.png", "../../secret.png", "~/dog.png", "dog.png",
    "http://example.com/a.png", "https://example.com/a.png", "file:///etc/passwd", "file:dog.png",
    "ftp://example.com/a.png", "data:image/png;base64,!!", "data:text/plain,hello", "not base64 !!",
    base64.b64encode(b"hello world").decode(), "data:image/png;base64," + base64.b64encode(b"%PDF-1.4").decode(),
    base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode(), "QUJD=", "A",
]


@pytest.mark.parametrize("value", NOT_IMAGES)
def test_paths_urls_and_other_text_are_refused_without_opening_files(value, monkeypatch, tmp_path):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    for field, args in (("subjects[0].image", {"image": value, "query": "q"}),
                        ("subjects[0].mask", {"image": BAD, "mask": value})):
        with pytest.raises(ArgumentError) as info:
            parse_script_args([{"subjects": [args]}])
        assert info.value.field == field
        assert "not a base64 image or data URL" in str(info.value)
    assert not [fp for fp in opened if not isinstance(fp, io.BytesIO)]  # nothing but decoded bytes


def test_a_real_file_path_is_not_read(tmp_path):
    path = tmp_path / "dog.png"
    path.write_bytes(encoded(photo(), "PNG"))
    for value in (str(path), "file://" + str(path)):
        with pytest.raises(ArgumentError, match="not a base64 image or data URL"):
            decode_reference(value)
    with pytest.raises(ArgumentError, match="URLs and server paths are not accepted"):
        decode_reference("file://" + str(path))


# ----------------------------------------------------------------------------- UI field names (issue 9, item 10)

UI_ERRORS = [
    ([True, 0.65, 0, 1, None, None, None, "q", 1, 5], "Subject 1", "Subject 1: a query was given but no reference image"),
    ([True, 0.65, 0, 1, None, None, None, "", 1, 5, None, "a cat", 1, 5], "Subject 2",
     "Subject 2: a query was given but no reference image"),
    ([True, 5, 0, 1, None, None, BAD, "q", 1, 5], "Subject scale", "Subject scale: 5 is out of range"),
    ([True, 0.65, 0.6, 0.5, None, None, BAD, "q", 1, 5], "End at", "End at: 0.5 must be greater than Start at (0.6)"),
    ([True, 0.65, 0, 1, None, None, BAD, "q", 9, 5], "Subject 1 weight", "Subject 1 weight: 9 is out of range"),
    ([True, 0.65, 0, 1, None, None, BAD, "q", 1, 50], "Subject 1 mask strength", "Subject 1 mask strength: 50 is out of range"),
    ([True, 0.65, 0, 1, None, None, BAD, "", 1, 5], "Subject 1 query", "Subject 1 query: give a query text"),
    ([True, 0.65, 0, 1, None, None, {"image": photo(), "mask": mask_image(48, 64)}, "", 1, 5], "Subject 1 mask",
     "Subject 1 mask: mask is 48x64"),
    ([True, 0.65, 0, 1, None, None, None, "", 1, 5], "SSR-Encoder", "SSR-Encoder: no subject"),
    ([True, 0.65, 0, 1, 3, None, BAD, "q", 1, 5], "SSR weights", "SSR weights: expected a file name"),
]


@pytest.mark.parametrize("args,field,start", UI_ERRORS, ids=[e[1] for e in UI_ERRORS])
def test_ui_errors_name_ui_fields(args, field, start):
    with pytest.raises(ArgumentError) as info:
        parse_script_args(args)
    assert info.value.field == field
    assert str(info.value).startswith(start)
    assert "args[" not in str(info.value) and "subjects[" not in str(info.value)


def test_request_names_fields_in_its_own_form():
    ui = parse_script_args([True, 0.65, 0, 1, None, None, BAD, "q", 1, 5])
    api = parse_script_args(api_args())
    assert (ui.field_name("model"), ui.field_name("clip_model")) == ("SSR weights", "CLIP ViT-L/14 vision weights")
    assert (api.field_name("model"), api.field_name("clip_model")) == ("model", "clip_model")
