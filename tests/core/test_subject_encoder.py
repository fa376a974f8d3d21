"""SubjectEncoder (token-to-patch aligner + per-scale values) against a straightforward einsum
implementation of docs/method.md, section 4, and mask_logit_bias on hand-computed masks.

SubjectEncoder comparisons run in float64 (tolerance 1e-10): both sides do the same maths in
a different order, so any larger difference is a real disagreement.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssr.image_encoder import mask_logit_bias
from ssr.subject_encoder import SubjectEncoder, SubjectEncoderConfig, attention_heatmap
from tests.tiny_models import randomize_

TOL64 = 1e-10


def reference_subject_encoder(enc: SubjectEncoder, z_q, states, bias=None):
    """c_s = LayerNorm(concat_k O_k(merge(softmax(Q K^T / sqrt(d) + bias) V_k))), A shared."""
    W = {k: v for k, v in enc.state_dict().items()}
    h = enc.config.heads
    q = (z_q @ W["to_q.weight"].T).unflatten(-1, (h, -1))  # [B, L, h, d]
    k = (states[-1] @ W["to_k.weight"].T).unflatten(-1, (h, -1))  # [B, T, h, d]
    logits = torch.einsum("blhd,bthd->bhlt", q, k) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    attn = logits.softmax(-1)
    outs = []
    for s, z in enumerate(states):
        v = (z @ W[f"to_v.{s}.weight"].T).unflatten(-1, (h, -1))
        merged = torch.einsum("bhlt,bthd->blhd", attn, v).flatten(2)
        outs.append(merged @ W[f"to_out.{s}.weight"].T)
    cat = torch.cat(outs, dim=1)
    mean = cat.mean(-1, keepdim=True)
    var = ((cat - mean) ** 2).mean(-1, keepdim=True)
    normed = (cat - mean) / torch.sqrt(var + 1e-5) * W["norm.weight"] + W["norm.bias"]
    return normed, attn, outs


@pytest.fixture(scope="module")
def encoder64():
    enc = SubjectEncoder(SubjectEncoderConfig(text_dim=48, image_dim=40, inner_dim=32, heads=4))
    return randomize_(enc, seed=2).double().eval()


def inputs64(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_q = torch.randn(batch, 77, 48, generator=g, dtype=torch.float64)
    states = [torch.randn(batch, 257, 40, generator=g, dtype=torch.float64) * (1 + s) for s in range(6)]
    return z_q, states


def test_subject_encoder_matches_reference(encoder64):
    z_q, states = inputs64()
    with torch.no_grad():
        c_s, attn, scales = encoder64(z_q, states, return_scales=True)
    ref, ref_attn, ref_scales = reference_subject_encoder(encoder64, z_q, states)
    assert c_s.shape == (2, 6 * 77, 48) and attn.shape == (2, 4, 77, 257)
    assert (c_s - ref).abs().max() < TOL64
    assert (attn - ref_attn).abs().max() < TOL64
    assert all((a - b).abs().max() < TOL64 for a, b in zip(scales, ref_scales))
    assert torch.allclose(attn.sum(-1), torch.ones(()).double())


def test_subject_encoder_with_mask_bias_matches_reference(encoder64):
    z_q, states = inputs64(seed=1)
    mask = np.zeros((32, 32), np.float32)
    mask[4:20, 2:13] = 1
    bias = torch.stack([mask_logit_bias(mask), torch.zeros(257)]).double()  # row 1: no mask
    with torch.no_grad():
        c_s, attn = encoder64(z_q, states, bias)
        plain, _ = encoder64(z_q, states)
        shared, _ = encoder64(z_q[:1], [s[:1] for s in states], bias[0])  # 1-D bias, one image
    ref, ref_attn, _ = reference_subject_encoder(encoder64, z_q, states, bias)
    assert (c_s - ref).abs().max() < TOL64
    assert (attn - ref_attn).abs().max() < TOL64
    assert (c_s[1] - plain[1]).abs().max() < TOL64  # zero bias == no bias
    assert (c_s[0] - plain[0]).abs().max() > 1e-2  # the mask really changes the subject
    assert (shared[0] - c_s[0]).abs().max() < TOL64
    # the mask moves attention mass onto the masked patches
    inside = torch.from_numpy(np.concatenate([[0.0], F.interpolate(torch.from_numpy(mask)[None, None], size=(16, 16),
                                                                   mode="bilinear").flatten().numpy()])) > 0.5
    assert attn[0, ..., inside].sum(-1).mean() > attn[1, ..., inside].sum(-1).mean()


def test_query_batch_of_one_is_broadcast(encoder64):
    z_q, states = inputs64(seed=2)
    with torch.no_grad():
        c_s, _ = encoder64(z_q[:1], states)
    ref, _, _ = reference_subject_encoder(encoder64, z_q[:1].expand(2, -1, -1), states)
    assert (c_s - ref).abs().max() < TOL64


def test_wrong_number_of_scales_is_an_error(encoder64):
    z_q, states = inputs64()
    with pytest.raises(ValueError, match="6 image feature scales, got 5"):
        encoder64(z_q, states[:5])


def test_default_config_is_the_released_shape():
    enc = SubjectEncoder()
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes["to_q.weight"] == (512, 768) and shapes["to_k.weight"] == (512, 1024)
    assert all(shapes[f"to_v.{s}.weight"] == (512, 1024) and shapes[f"to_out.{s}.weight"] == (768, 512) for s in range(6))
    assert shapes["norm.weight"] == shapes["norm.bias"] == (768,)
    assert len(shapes) == 16  # to_q, to_k, 6 to_v, 6 to_out, norm weight and bias
    assert abs(sum(p.numel() for p in enc.parameters()) / 1e6 - 6.4) < 0.1  # ~6.4 M (docs/method.md, section 4)


def test_attention_heatmap_points_at_attended_patch():
    attn = torch.full((1, 2, 77, 257), 1e-4)
    attn[..., 1 + 3 * 16 + 5] = 1.0  # patch row 3, column 5
    hm = attention_heatmap(attn)
    assert hm.shape == (1, 16, 16) and hm[0, 3, 5] == 1.0 and hm.max() == 1.0
    assert hm[0].flatten().argmax() == 3 * 16 + 5


# ----------------------------------------------------------------------------- mask bias

def patches(bias: torch.Tensor) -> torch.Tensor:
    assert bias.shape == (257,) and bias.dtype == torch.float32
    assert bias[0] == 1.0  # CLS always +1
    return bias[1:].view(16, 16)


def test_mask_bias_left_half():
    mask = np.zeros((32, 32), np.float32)
    mask[:, :16] = 1.0
    p = patches(mask_logit_bias(mask, weight=5.0))
    assert torch.equal(p[:, :8], torch.full((16, 8), 25.0))  # 5 * (1 * 6 - 1)
    assert torch.equal(p[:, 8:], torch.full((16, 8), -5.0))  # 5 * (0 * 6 - 1)
    p1 = patches(mask_logit_bias(mask, weight=1.0))
    assert torch.equal(p1[:, :8], torch.ones(16, 8)) and torch.equal(p1[:, 8:], -torch.ones(16, 8))


def test_mask_bias_fractional_edges():
    """White square rows/cols 0..16 of 32: bilinear (align_corners=False, no antialias) samples
    output pixel 8 halfway between input pixels 16 (white) and 17 (black)."""
    mask = np.zeros((32, 32), np.float32)
    mask[:17, :17] = 1.0
    p = patches(mask_logit_bias(mask, weight=5.0))
    expected = torch.full((16, 16), -5.0)
    expected[:8, :8] = 25.0
    expected[:8, 8] = expected[8, :8] = 5 * (0.5 * 6 - 1)  # 10
    expected[8, 8] = 5 * (0.25 * 6 - 1)  # 2.5
    assert torch.allclose(p, expected, atol=1e-5)
    p1 = patches(mask_logit_bias(mask, weight=1.0))
    assert abs(p1[0, 8].item()) < 1e-6  # 1 * (0.5 * 2 - 1)


def test_mask_is_binarised_before_resizing():
    mask = np.full((32, 32), 0.4, np.float32)  # grey below 0.5 counts as not selected
    mask[:, :16] = 0.6
    left_half = np.zeros((32, 32), np.float32)
    left_half[:, :16] = 1
    assert torch.equal(mask_logit_bias(mask), mask_logit_bias(left_half))


def test_mask_input_types_agree():
    arr = np.zeros((48, 48), np.uint8)
    arr[10:30, 5:40] = 255
    ref = mask_logit_bias(arr.astype(np.float32) / 255)
    rgb = np.repeat(arr[..., None], 3, axis=2)
    sketch = np.zeros((48, 48, 4), np.uint8)
    sketch[..., :3] = 255
    sketch[..., 3] = arr  # a painted sketch layer: white where opaque
    for m in [arr, arr > 0, torch.from_numpy(arr.astype(np.float32) / 255), Image.fromarray(arr),
              Image.fromarray(rgb), Image.fromarray(sketch, "RGBA"), rgb]:
        assert torch.equal(mask_logit_bias(m), ref), type(m)


def test_non_square_mask_gets_the_image_centre_crop():
    """The mask is cropped like the image (centred square), then resized."""
    square = np.zeros((32, 32), np.float32)
    square[:, :16] = 1
    wide = np.zeros((32, 64), np.float32)
    wide[:, 16:32] = 1  # left half of the centred 32x32 square
    assert torch.equal(mask_logit_bias(wide), mask_logit_bias(square))
    tall = np.zeros((64, 32), np.float32)
    tall[16:32, :] = 1  # top half of the centred square
    assert torch.equal(mask_logit_bias(tall), mask_logit_bias(square.T.copy()))


def test_mask_outside_centre_square_is_an_error():
    wide = np.zeros((32, 64), np.float32)
    wide[:, :16] = 1  # only in the left strip CLIP never sees
    with pytest.raises(ValueError, match="subject 2 mask.*outside the centred square"):
        mask_logit_bias(wide, what="subject 2 mask")


@pytest.mark.parametrize("empty", [np.zeros((32, 32), np.float32), np.full((20, 30), 0.3, np.float32),
                                   Image.new("L", (40, 40), 0)])
def test_empty_mask_is_an_error(empty):
    with pytest.raises(ValueError, match="mask is empty"):
        mask_logit_bias(empty)


def test_bad_mask_shape_is_an_error():
    with pytest.raises(ValueError, match="mask.*2-D"):
        mask_logit_bias(np.ones((2, 3, 4, 5), np.float32))
