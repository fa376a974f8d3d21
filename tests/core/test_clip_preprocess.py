"""clip_preprocess against torchvision's CLIP transform (Resize(224, bicubic) + CenterCrop +
ToTensor + Normalize) applied to the equivalent RGB PIL image.

Tolerances: PIL inputs go through the same PIL resampling, so they must agree to float
rounding (1e-5). Float inputs are quantised to 8 bits on the way to PIL; the two sides may
round differently by one level, which after resampling and normalisation is < 0.03.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ssr.image_encoder import CLIP_MEAN, CLIP_STD, clip_preprocess, unconditional_pixels

REFERENCE = transforms.Compose([
    transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(CLIP_MEAN, CLIP_STD),
])
EXACT, QUANTISED = 1e-5, 0.03
SIZES = [(224, 224), (300, 200), (200, 300), (500, 224), (97, 131), (10, 7)]  # (width, height)


def random_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random image (HxWx3 uint8), so resampling differences stay realistic."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, size=(max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def reference(pil_rgb: Image.Image) -> torch.Tensor:
    assert pil_rgb.mode == "RGB"
    return REFERENCE(pil_rgb)[None]


def check(ours: torch.Tensor, ref: torch.Tensor, tol: float):
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"max abs difference {err:.3g} > {tol}"


@pytest.mark.parametrize("size", SIZES)
def test_pil_rgb(size):
    pil = Image.fromarray(random_rgb(*size))
    check(clip_preprocess(pil), reference(pil), EXACT)


@pytest.mark.parametrize("size", [(300, 200), (131, 97)])
def test_pil_rgba_composited_over_white(size):
    rgb = random_rgb(*size, seed=1).astype(np.float64)
    alpha = np.random.default_rng(2).integers(0, 256, size=rgb.shape[:2]).astype(np.float64)
    rgba = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")
    a = alpha[..., None] / 255.0
    over_white = Image.fromarray(np.round(rgb * a + 255.0 * (1 - a)).astype(np.uint8))
    check(clip_preprocess(rgba), reference(over_white), QUANTISED)
    # fully transparent -> pure white
    clear = Image.new("RGBA", size, (0, 0, 0, 0))
    check(clip_preprocess(clear), reference(Image.new("RGB", size, (255, 255, 255))), EXACT)


@pytest.mark.parametrize("size", [(224, 224), (200, 300)])
def test_pil_grayscale_and_palette(size):
    gray = random_rgb(*size, seed=3)[..., 0]
    pil_l = Image.fromarray(gray, "L")
    rgb_from_gray = Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    check(clip_preprocess(pil_l), reference(rgb_from_gray), EXACT)
    pil_p = Image.fromarray(random_rgb(*size, seed=4)).convert("P")
    expected = Image.fromarray(np.asarray(pil_p.convert("RGB")))
    check(clip_preprocess(pil_p), reference(expected), EXACT)


@pytest.mark.parametrize("size", [(300, 200), (97, 131)])
def test_numpy_uint8_and_float(size):
    arr = random_rgb(*size, seed=5)
    ref = reference(Image.fromarray(arr))
    check(clip_preprocess(arr), ref, EXACT)
    check(clip_preprocess(arr.astype(np.float32) / 255.0), ref, QUANTISED)
    check(clip_preprocess(arr.astype(np.float64) / 255.0), ref, QUANTISED)


def test_numpy_grayscale_hw_and_hw1():
    gray = random_rgb(250, 180, seed=6)[..., 0]
    ref = reference(Image.fromarray(np.repeat(gray[..., None], 3, axis=2)))
    check(clip_preprocess(gray), ref, EXACT)
    check(clip_preprocess(gray[..., None]), ref, EXACT)
    check(clip_preprocess(gray.astype(np.float32) / 255.0), ref, QUANTISED)


@pytest.mark.parametrize("size", [(300, 200), (224, 224)])
def test_tensor_chw_float(size):
    arr = random_rgb(*size, seed=7)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    check(clip_preprocess(t), reference(Image.fromarray(arr)), QUANTISED)


def test_batches_and_lists():
    arrs = [random_rgb(300, 200, seed=8), random_rgb(160, 240, seed=9), random_rgb(224, 224, seed=10)]
    refs = torch.cat([reference(Image.fromarray(a)) for a in arrs])
    out = clip_preprocess([Image.fromarray(a) for a in arrs])
    assert out.shape == (3, 3, 224, 224)
    assert (out - refs).abs().max() <= EXACT
    same = torch.from_numpy(np.stack([arrs[0], arrs[0]])).permute(0, 3, 1, 2).float() / 255.0
    out = clip_preprocess(same)  # a [B, 3, H, W] tensor is a batch
    assert out.shape == (2, 3, 224, 224)
    assert (out - reference(Image.fromarray(arrs[0]))).abs().max() <= QUANTISED


def test_centre_crop_geometry():
    """A wide image whose centre square is red and sides blue -> all red after preprocessing."""
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :, 2] = 255
    arr[:, 100:200] = (255, 0, 0)
    out = clip_preprocess(arr)[0]
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    # bicubic ringing only touches a couple of border columns
    assert torch.allclose(out[:, :, 4:-4], red.view(3, 1, 1).expand(3, 224, 216), atol=1e-5)


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
