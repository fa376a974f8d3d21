"""clip_preprocess against the thing the released weights were trained with: transformers'
CLIPImageProcessor (its Pillow path, ``CLIPImageProcessorPil`` where it exists), configured as
openai/clip-vit-large-patch14's preprocessor_config.json: shortest edge resized to 224 with
Pillow's bicubic, centre crop 224x224, rescale 1/255, CLIP mean/std, convert to RGB.

Tolerances: for 8-bit inputs both sides run the same Pillow resize on the same pixels and
crop the same rows and columns, so they agree to float32 rounding of the rescale/normalise
arithmetic: EXACT = 1e-6 (a one-pixel crop shift or a different resample is > 1e-2). Float
inputs are quantised to 8 bits on our side; the two sides may round differently by one level,
which after resampling and normalisation is < 0.03 (QUANTISED).

The size sweep covers every excess of the resized long side over 224 modulo 4 (the centre
crop offset is ``excess // 2``; rounding half to even instead moves it by one pixel when the
excess is 3 mod 4), in both orientations, sizes around 224 and images smaller than 224.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from ssr.image_encoder import CLIP_MEAN, CLIP_STD, clip_preprocess, mask_logit_bias, unconditional_pixels

Processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
REFERENCE = Processor(
    do_resize=True, size={"shortest_edge": 224}, resample=Image.BICUBIC,
    do_center_crop=True, crop_size={"height": 224, "width": 224},
    do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    do_convert_rgb=True,
)
EXACT, QUANTISED = 1e-6, 0.03

# (width, height). Excess = int(224 * long / short) - 224; the comment gives excess mod 4.
SWEEP = [
    (1024, 683), (683, 1024),  # 111 -> 3
    (640, 427), (427, 640),  # 111 -> 3
    (1000, 667), (667, 1000),  # 111 -> 3
    (300, 224), (224, 300),  # 76 -> 0
    (301, 224), (224, 301),  # 77 -> 1
    (302, 224), (224, 302),  # 78 -> 2
    (303, 224), (224, 303),  # 79 -> 3
    (225, 224), (226, 224), (227, 224), (228, 224), (229, 224), (230, 224), (231, 224),  # excess 1..7
    (224, 225), (224, 226), (224, 227), (224, 228), (224, 229), (224, 230), (224, 231),
    (224, 224), (500, 500),
    (97, 131), (131, 97), (10, 7), (7, 10), (1, 1), (3, 40), (200, 150), (150, 200),  # smaller than 224
]


def excess(size):
    w, h = size
    short, long = min(w, h), max(w, h)
    return int(224 * long / short) - 224


def test_sweep_covers_every_excess_mod_4_in_both_orientations():
    for orientation in (lambda s: s[0] > s[1], lambda s: s[0] < s[1]):
        assert {excess(s) % 4 for s in SWEEP if orientation(s)} == {0, 1, 2, 3}


def random_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random image (HxWx3 uint8) with fine detail, so a one-pixel shift shows."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, size=(max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), dtype=np.int16)
    noise = g.integers(-20, 21, size=smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def reference(pil: Image.Image) -> torch.Tensor:
    out = REFERENCE(images=[pil], return_tensors="np")["pixel_values"]
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def check(ours: torch.Tensor, ref: torch.Tensor, tol: float):
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"max abs difference {err:.3g} > {tol}"


@pytest.mark.parametrize("size", SWEEP, ids=[f"{w}x{h}" for w, h in SWEEP])
def test_pil_rgb_matches_clip_image_processor(size):
    pil = Image.fromarray(random_rgb(*size, seed=sum(size)))
    check(clip_preprocess(pil), reference(pil), EXACT)


@pytest.mark.parametrize("size", [(1024, 683), (683, 1024), (303, 224)])
def test_modes_match_clip_image_processor(size):
    """L, P, RGBA (transparency over white), LA, P with a transparent index, CMYK."""
    rgb = random_rgb(*size, seed=1)
    alpha = np.random.default_rng(2).integers(0, 256, size=rgb.shape[:2], dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P")
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = int(np.asarray(palette)[0, 0])
    images = [
        Image.fromarray(rgb[..., 0], "L"),
        palette,
        palette_transparent,
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
        Image.fromarray(np.dstack([rgb[..., 1], alpha]), "LA"),
        Image.fromarray(rgb).convert("CMYK"),
        Image.new("RGBA", size, (0, 0, 0, 0)),  # fully transparent -> white
    ]
    for image in images:
        check(clip_preprocess(image), reference(image), EXACT)


@pytest.mark.parametrize("size", [(1024, 683), (97, 131)])
def test_numpy_uint8_and_float(size):
    arr = random_rgb(*size, seed=5)
    ref = reference(Image.fromarray(arr))
    check(clip_preprocess(arr), ref, EXACT)
    check(clip_preprocess(arr.astype(np.float32) / 255.0), ref, QUANTISED)
    check(clip_preprocess(arr.astype(np.float64) / 255.0), ref, QUANTISED)


def test_numpy_grayscale_hw_and_hw1():
    gray = random_rgb(250, 181, seed=6)[..., 0]
    ref = reference(Image.fromarray(gray, "L"))
    check(clip_preprocess(gray), ref, EXACT)
    check(clip_preprocess(gray[..., None]), ref, EXACT)
    check(clip_preprocess(gray.astype(np.float32) / 255.0), ref, QUANTISED)


@pytest.mark.parametrize("size", [(640, 427), (224, 224)])
def test_tensor_chw_float(size):
    arr = random_rgb(*size, seed=7)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    check(clip_preprocess(t), reference(Image.fromarray(arr)), QUANTISED)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    """A 16-bit grey image ("I;16") is read as 8-bit grey (value / 257), not clipped at 255."""
    grey8 = random_rgb(300, 203, seed=11)[..., 0]
    grey16 = Image.fromarray(grey8.astype(np.uint16) * 257, "I;16")
    check(clip_preprocess(grey16), reference(Image.fromarray(grey8, "L")), EXACT)
    as_i = Image.fromarray(grey8.astype(np.int32) * 257, "I")  # what some Pillow versions give for 16-bit PNG
    check(clip_preprocess(as_i), reference(Image.fromarray(grey8, "L")), EXACT)


def test_batches_and_lists():
    arrs = [random_rgb(1024, 683, seed=8), random_rgb(160, 240, seed=9), random_rgb(224, 224, seed=10)]
    refs = torch.cat([reference(Image.fromarray(a)) for a in arrs])
    out = clip_preprocess([Image.fromarray(a) for a in arrs])
    assert out.shape == (3, 3, 224, 224)
    check(out, refs, EXACT)
    same = torch.from_numpy(np.stack([arrs[0], arrs[0]])).permute(0, 3, 1, 2).float() / 255.0
    out = clip_preprocess(same)  # a [B, 3, H, W] tensor is a batch
    assert out.shape == (2, 3, 224, 224)
    check(out, torch.cat([refs[:1], refs[:1]]), QUANTISED)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="image 0.*shape"):
        clip_preprocess(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(TypeError, match="image 0.*PIL image, numpy array or tensor"):
        clip_preprocess(["not an image"])
    with pytest.raises(ValueError, match="no images"):
        clip_preprocess([])


def test_unconditional_pixels_are_normalised_zeros():
    z = unconditional_pixels(2)
    assert z.shape == (2, 3, 224, 224) and not z.any()


# ----------------------------------------------------------------------------- the mask crop

def processor_crop_offsets(size):
    """Where CLIPImageProcessor puts its crop, (left, top) in resized pixels, and the resized
    (width, height): found by matching its output against every crop of the same Pillow
    resize (the resize size is the one check that the image tests above already pin down)."""
    w, h = size
    new_w, new_h = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    image = Image.fromarray(random_rgb(w, h, seed=3))
    resized = np.asarray(image.resize((new_w, new_h), Image.BICUBIC), dtype=np.float32) / 255.0
    resized = (resized - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    ref = reference(image)[0].permute(1, 2, 0).numpy()
    matches = [(x, y) for y in range(new_h - 224 + 1) for x in range(new_w - 224 + 1)
               if np.abs(resized[y:y + 224, x:x + 224] - ref).max() <= 1e-5]
    assert len(matches) == 1, (size, matches)
    return matches[0], (new_w, new_h)


def bilinear_at(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """1-D linear interpolation of ``values`` at pixel-index positions (clamped at the ends)."""
    positions = np.clip(positions, 0, len(values) - 1)
    lo = np.floor(positions).astype(int)
    hi = np.minimum(lo + 1, len(values) - 1)
    frac = positions - lo
    return values[lo] * (1 - frac) + values[hi] * frac


@pytest.mark.parametrize("size,mask_size", [
    ((1024, 683), None), ((683, 1024), None), ((640, 427), None), ((303, 224), None), ((224, 231), None),
    ((1024, 683), (512, 342)), ((427, 640), (854, 1280)),  # a mask at another resolution than the image
], ids=lambda v: "same" if v is None else f"{v[0]}x{v[1]}")
def test_mask_grid_follows_the_image_crop(size, mask_size):
    """Grid cell (i, j) of the mask bias is the mask sampled (bilinearly) at the centre of CLIP's
    patch (i, j), mapped back to the original image through the processor's resize and crop:
    patch centre in the crop at 14 j + 7 -> resized (offset + 14 j + 7) -> image pixels ->
    mask pixels."""
    w, h = size
    mw, mh = mask_size or size
    weight = 3.0
    offsets, lengths = processor_crop_offsets(size)
    axes = [(offsets[1], lengths[1], h, mh), (offsets[0], lengths[0], w, mw)]  # rows, then columns
    centres = [(offset + 14 * np.arange(16) + 7) * n_image / length * (n_mask / n_image) - 0.5
               for offset, length, n_image, n_mask in axes]
    for k in range(4):
        # The mask is 1 below row y0 and right of column x0, each edge just after the centre of
        # patch row/column k: the sampled value there is the centre's fractional part, so any
        # shift of the crop or change of its scale shows.
        y0, x0 = (int(np.floor(c[k])) + 1 for c in centres)
        mask = np.zeros((mh, mw), np.float32)
        mask[y0:, x0:] = 1.0
        expected_axes = [bilinear_at((np.arange(n_mask) >= edge).astype(np.float64), c)
                         for (_, _, _, n_mask), c, edge in zip(axes, centres, (y0, x0))]
        expected = np.outer(*expected_axes).flatten()
        bias = mask_logit_bias(mask, weight=weight, grid=16, **({"image_size": size} if mask_size else {})).numpy()
        got = (bias[1:] / weight + 1.0) / (1.0 + weight)
        assert bias[0] == 1.0
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{size} edge at x={x0}, y={y0}")
