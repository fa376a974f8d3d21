"""SubjectEmbedder: subjects -> (subject, unconditional) contexts, checked against direct
calls of the parts (clip_preprocess -> ClipImageEncoder -> text encoder -> SubjectEncoder).

Tolerance 1e-5 absolute on LayerNorm-ed tokens of O(1): the embedder batches subjects, the
direct computation does one at a time, so only float32 summation order differs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssr.image_encoder import clip_preprocess, mask_logit_bias
from ssr.subjects import EncodedSubjects, Subject, SubjectEmbedder
from tests.tiny_models import SUBJECT_TOKENS

TOL = 1e-5


def image(seed: int, size=(96, 64)) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def left_mask(size=(96, 64)) -> np.ndarray:
    m = np.zeros((size[1], size[0]), np.float32)
    m[:, 20:48] = 1
    return m


@pytest.fixture
def embedder(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny):
    emb = SubjectEmbedder(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, model_key="tiny")
    emb.image_calls = []
    handle = clip_encoder_tiny.register_forward_hook(lambda m, args, out: emb.image_calls.append(args[0].shape[0]))
    yield emb
    handle.remove()


def direct(clip, ssr, text, pixels, query, bias=None):
    """c_s [462, D] for one subject by calling the parts directly."""
    with torch.no_grad():
        states = clip(pixels)
        z_q = text([query])
        c_s, _ = ssr.encoder(z_q, states, None if bias is None else bias[None])
    return c_s[0]


def test_unconditional_is_aligner_of_empty_query_and_zero_image(embedder, clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny):
    zeros = torch.zeros(1, 3, 224, 224)  # already-normalised zero input, not a black image
    expected = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, zeros, "")
    uncond = embedder.unconditional()
    assert uncond.shape == (SUBJECT_TOKENS, 32)
    assert (uncond - expected).abs().max() < TOL
    black = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, clip_preprocess(Image.new("RGB", (8, 8))), "")
    assert (uncond - black).abs().max() > 1e-2  # zeros in normalised space differ from a black image
    calls = len(embedder.image_calls)
    assert torch.equal(embedder.unconditional(), uncond) and len(embedder.image_calls) == calls  # cached

    bias = mask_logit_bias(left_mask())
    with_bias = embedder.unconditional(bias)
    expected = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, zeros, "", bias)
    assert (with_bias - expected).abs().max() < TOL
    assert (with_bias - uncond).abs().max() > 1e-3


def test_single_text_subject(embedder, clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny):
    img = image(1)
    enc = embedder.encode([Subject(img, "a red dog")])
    assert isinstance(enc, EncodedSubjects)
    assert enc.tokens.shape == (2, SUBJECT_TOKENS, 32) and enc.tokens.dtype == torch.float32
    expected = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, clip_preprocess(img), "a red dog")
    assert (enc.tokens[EncodedSubjects.SUBJECT] - expected).abs().max() < TOL
    assert (enc.tokens[EncodedSubjects.UNCONDITIONAL] - embedder.unconditional()).abs().max() < TOL
    assert torch.equal(enc.value_weights, torch.ones(SUBJECT_TOKENS))
    assert enc.attention[0].shape == (8, 77, 257) and enc.heatmaps[0].shape == (16, 16)
    assert enc.heatmaps[0].max() == 1.0


def test_cache_hits_for_same_content(embedder):
    img = image(2)
    first = embedder.encode([Subject(img, "a cat")])
    calls, hits = list(embedder.image_calls), embedder.cache_hits
    again = embedder.encode([Subject(img.copy(), "a cat")])  # a different object, same pixels
    assert embedder.image_calls == calls and embedder.cache_hits > hits
    assert torch.equal(again.tokens, first.tokens)
    as_array = embedder.encode([Subject(np.asarray(img), "a cat")])  # same content as numpy
    assert embedder.image_calls == calls and torch.equal(as_array.tokens, first.tokens)
    embedder.encode([Subject(img, "a dog")])  # other query -> encoded again
    assert len(embedder.image_calls) == len(calls) + 1
    embedder.encode([Subject(img, "a cat", mask=left_mask())])  # a mask -> encoded again
    assert len(embedder.image_calls) == len(calls) + 3  # the subject + its masked unconditional
    embedder.encode([Subject(img, "a cat", mask=left_mask(), mask_weight=1.0)])  # other mask weight
    assert len(embedder.image_calls) == len(calls) + 5


def test_cache_is_bounded(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny):
    emb = SubjectEmbedder(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, cache_size=2)
    for seed in range(4):
        emb.encode([Subject(image(seed, (32, 32)), "x")])
    assert len(emb._cache) == 2


def test_several_subjects_concatenated_with_value_weights(embedder, clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny):
    subjects = [Subject(image(3), "a dog", weight=1.0), Subject(image(4, (64, 96)), "a hat", weight=0.5),
                Subject(image(5), "", weight=2.0)]
    enc = embedder.encode(subjects)
    assert enc.tokens.shape == (2, 3 * SUBJECT_TOKENS, 32)
    assert embedder.image_calls[-2] == 3  # the three subjects went through CLIP as one batch
    for s, subject in enumerate(subjects):
        part = slice(s * SUBJECT_TOKENS, (s + 1) * SUBJECT_TOKENS)
        expected = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, clip_preprocess(subject.image), subject.query)
        assert (enc.tokens[0, part] - expected).abs().max() < TOL, s
        assert (enc.tokens[1, part] - embedder.unconditional()).abs().max() < TOL, s
        assert torch.equal(enc.value_weights[part], torch.full((SUBJECT_TOKENS,), subject.weight))
    assert len(enc.attention) == len(enc.heatmaps) == 3


def test_mixed_text_and_mask_subjects(embedder, clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny):
    """A mask subject gets its logit bias (also on its unconditional tokens); a text subject
    in the same batch gets none."""
    text_subject = Subject(image(6), "a vase")
    mask = left_mask()
    mask_subject = Subject(image(7), "", mask=mask, mask_weight=5.0)
    enc = embedder.encode([text_subject, mask_subject])
    bias = mask_logit_bias(mask, 5.0)
    m = SUBJECT_TOKENS
    exp_text = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, clip_preprocess(text_subject.image), "a vase")
    exp_mask = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, clip_preprocess(mask_subject.image), "", bias)
    assert (enc.tokens[0, :m] - exp_text).abs().max() < TOL
    assert (enc.tokens[0, m:] - exp_mask).abs().max() < TOL
    exp_mask_uncond = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, torch.zeros(1, 3, 224, 224), "", bias)
    assert (enc.tokens[1, :m] - embedder.unconditional()).abs().max() < TOL
    assert (enc.tokens[1, m:] - exp_mask_uncond).abs().max() < TOL
    no_mask = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, clip_preprocess(mask_subject.image), "")
    assert (enc.tokens[0, m:] - no_mask).abs().max() > 1e-2  # the mask had an effect
    assert mask_subject.mode == "mask" and text_subject.mode == "text"


def test_preview_returns_heatmap(embedder):
    heatmap, attn = embedder.preview(Subject(image(8), "a dog"))
    assert heatmap.shape == (16, 16) and attn.shape == (8, 77, 257)
    assert 0 <= heatmap.min() and heatmap.max() == 1.0


def test_errors_name_the_subject(embedder):
    with pytest.raises(ValueError, match="no subjects"):
        embedder.encode([])
    with pytest.raises(ValueError, match="subject 2 mask is empty"):
        embedder.encode([Subject(image(9), "a"), Subject(image(9), "", mask=np.zeros((64, 96), np.float32))])
    with pytest.raises(TypeError, match="subject 1 image"):
        embedder.encode([Subject("not an image", "a")])


def test_more_subjects_than_cache_slots(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny):
    """A cache smaller than one generation's subjects still returns every subject's tokens."""
    emb = SubjectEmbedder(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, cache_size=1)
    subjects = [Subject(image(seed, (32, 32)), "x") for seed in range(3)]
    enc = emb.encode(subjects)
    assert enc.tokens.shape == (2, 3 * SUBJECT_TOKENS, 32)
    for k, subject in enumerate(subjects):
        expected = direct(clip_encoder_tiny, ssr_weights_tiny, text_encoder_tiny, clip_preprocess(subject.image), "x")
        assert (enc.tokens[0, k * SUBJECT_TOKENS:(k + 1) * SUBJECT_TOKENS] - expected).abs().max() < TOL


def test_weight_zero_removes_the_subject(embedder, unet, ssr_weights_tiny):
    """Weight 0 = the subject is not there: bit-identical tokens, weights and UNet output to
    leaving it out (its tokens would otherwise stay in the shared softmax). Other weights keep
    scaling values. All weights 0: no context, the UNet is untouched."""
    from ssr.attention import install_subject_attention
    from tests.tiny_models import unet_call, unet_inputs

    a = Subject(image(3), "a dog", weight=1.0)
    b = Subject(image(4, (64, 96)), "a hat", weight=0.0)
    c = Subject(image(5), "a vase", weight=0.5)
    x, t, ctx = unet_inputs(2, seed=4)

    def unet_output(encoded):
        handle = install_subject_attention(unet, ssr_weights_tiny.attention, scale=1.0)
        try:
            handle.set_context(encoded.tokens, encoded.value_weights)
            handle.set_rows([0, 1])
            with torch.no_grad():
                return unet_call(unet, x, t, ctx)
        finally:
            handle.remove()

    with torch.no_grad():
        plain = unet_call(unet, x, t, ctx)
    for with_zero, without in (([a, b], [a]), ([b, a], [a]), ([a, b, c], [a, c]), ([b, c], [c])):
        got, expected = embedder.encode(with_zero), embedder.encode(without)
        assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.value_weights, expected.value_weights)
        assert got.used == [i for i, s in enumerate(with_zero) if s.weight != 0]
        assert len(got.attention) == len(got.heatmaps) == len(without)
        out = unet_output(got)
        assert torch.equal(out, unet_output(expected))
        assert (out - plain).abs().max() > 1e-3  # the remaining subjects do act
    assert torch.equal(embedder.encode([a, c]).value_weights[SUBJECT_TOKENS:], torch.full((SUBJECT_TOKENS,), 0.5))

    nothing = embedder.encode([Subject(image(3), "a dog", weight=0.0), b])
    assert nothing.empty and nothing.used == [] and nothing.tokens.shape == (2, 0, 32)
    assert torch.equal(unet_output(nothing), plain)
    heatmap, _ = embedder.preview(b)  # the preview shows what a weight-0 subject would select
    assert heatmap.shape == (16, 16)
