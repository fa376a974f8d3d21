"""Issue 12, item 6: on gradio 4 (Forge) each subject image is an ``ImageEditor``; its value
``{"background", "layers", "composite"}`` is read as the uploaded image plus the painted
strokes as the mask, through the same parser as the sketch tool's ``{"image", "mask"}``."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ssr_webui.request import editor_image_and_mask, parse_subject, ui_subject_field


def _background():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def _layer(box=None):
    a = np.zeros((48, 64, 4), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        a[y0:y1, x0:x1] = (255, 255, 255, 200)
    return Image.fromarray(a, "RGBA")


def test_strokes_become_the_mask():
    bg = _background()
    image, mask = editor_image_and_mask({"background": bg, "layers": [_layer((10, 5, 30, 25))], "composite": bg})
    assert image is bg
    m = np.asarray(mask)
    assert m[10, 15] == 255 and m[40, 60] == 0 and set(np.unique(m)) == {0, 255}


def test_no_strokes_is_no_mask():
    bg = _background()
    assert editor_image_and_mask({"background": bg, "layers": [], "composite": bg}) == (bg, None)
    subject = parse_subject({"background": bg, "layers": [_layer()], "composite": bg}, "the dog", 1.0, 2.0,
                            prefix=ui_subject_field(0), slot=0)
    assert subject.mask is None and subject.mode == "text"


def test_parse_subject_reads_an_editor_value_like_a_sketch():
    bg = _background()
    from_editor = parse_subject({"background": bg, "layers": [_layer((10, 5, 30, 25))], "composite": bg}, "", 1.0, 2.0,
                                prefix=ui_subject_field(0), slot=0)
    sketch_mask = Image.fromarray(np.asarray(_layer((10, 5, 30, 25)))[..., 3].clip(0, 1) * 255)
    from_sketch = parse_subject({"image": bg, "mask": sketch_mask}, "", 1.0, 2.0, prefix=ui_subject_field(0), slot=0)
    assert from_editor.mode == "mask"
    assert np.array_equal(from_editor.mask, from_sketch.mask)


def test_empty_editor_is_an_empty_slot():
    assert parse_subject({"background": None, "layers": [], "composite": None}, "", 1.0, 2.0,
                         prefix=ui_subject_field(0), slot=0) is None


def test_untouched_editor_is_an_empty_slot():
    """What gradio 4.40 sends for an editor nothing was uploaded into (seen in Forge by the
    browser test): its empty 800x600 canvas, all transparent, as background, layer and composite.
    It is an empty slot, not a subject without a query (which failed every Forge generation with
    an empty slot: 'Subject 2 query: give a query text ...')."""
    blank = Image.new("RGBA", (800, 600), (0, 0, 0, 0))
    value = {"background": blank, "layers": [blank.copy()], "composite": blank.copy()}
    assert editor_image_and_mask(value) == (None, None)
    assert parse_subject(value, "", 1.0, 5.0, prefix=ui_subject_field(1), slot=1) is None
    # a query without an upload names the image, as for the sketch tool
    try:
        parse_subject(value, "the dog", 1.0, 5.0, prefix=ui_subject_field(1), slot=1)
    except ValueError as e:
        assert str(e).startswith("Subject 2: a query was given but no reference image"), e
    else:
        raise AssertionError("a query without an image was accepted")
    # a transparent picture that was uploaded (some pixel not transparent) is still an image
    partly = blank.copy()
    partly.putpixel((5, 5), (255, 0, 0, 255))
    assert editor_image_and_mask({"background": partly, "layers": [], "composite": partly})[0] is partly
