"""Every CFG row layout the real WebUI produces, checked layer by layer (hostcheck.verify):
cond rows carry the subject, uncond rows the unconditional subject, in the real
``processing`` / ``CFGDenoiser`` / script runner / callbacks / attention optimisations."""
from __future__ import annotations

import os

import pytest

import hostcheck
import payloads as pl
from conftest import MODELS


def _subject(seed=0, query="the red thing"):
    image = pl.reference_image(seed)
    return image, {"image": pl.encode(image), "query": query, "weight": 1.0}


def _expectation(host, subjects_pil, model=pl.TINY_SSR, scale=0.65, active_steps=None):
    import ssr

    weights, encoded = hostcheck.subject_reference(
        host, os.path.join(MODELS, "ssr_encoder", model), os.path.join(MODELS, pl.CLIP),
        [ssr.Subject(image=im, query=q) for im, q in subjects_pil])
    return hostcheck.Expectation(encoded.tokens, encoded.value_weights, weights, scale, active_steps)


def _run_and_verify(host, payload, subjects=((0, "the red thing"),), scale=0.65, expect_kinds=("subject", "unconditional-subject")):
    pils, dicts = [], []
    for seed, query in subjects:
        image, unit = _subject(seed, query)
        pils.append((image, query))
        dicts.append(unit)
    payload["alwayson_scripts"] = pl.alwayson(pl.ssr_unit(*dicts, scale=scale))
    with hostcheck.AttentionRecorder(host.unet) as rec:
        result = host.txt2img(**payload)
    assert "SSR error" not in result["info"], result["info"]
    counts = hostcheck.verify(rec, host.unet, _expectation(host, pils, scale=scale))
    for kind in expect_kinds:
        assert counts[kind] > 0, counts
    return counts, rec, result


LAYOUTS = {
    "batch 2": dict(prompt="a photo of a cat", negative_prompt="blurry", batch_size=2),
    "batch 1 x count 2": dict(prompt="a photo of a cat", negative_prompt="blurry", n_iter=2),
    "AND prompt": dict(prompt="a cat AND a hat", negative_prompt="blurry", batch_size=2),
    "empty negative": dict(prompt="a cat on a sofa", negative_prompt=""),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_row_layouts(tiny_host, layout):
    _run_and_verify(tiny_host, dict(LAYOUTS[layout]))


def test_batch_cond_uncond_off(tiny_host):
    tiny_host.set_options(batch_cond_uncond=False)
    try:
        counts, rec, _ = _run_and_verify(tiny_host, dict(prompt="a photo of a cat", negative_prompt="blurry", batch_size=2))
    finally:
        tiny_host.set_options(batch_cond_uncond=True)
    # each UNet call saw only one kind of row
    per_call = {}
    for c in rec.calls:
        per_call.setdefault((c.step, c.official), []).append(c.x.shape[0])
    assert any(len(v) >= 2 for v in per_call.values()), "cond and uncond were not split into separate calls"


def test_cond_and_uncond_of_different_token_lengths(tiny_host):
    long_prompt = ", ".join(f"word{i}" for i in range(60))  # > 75 tokens: cond is 154 tokens, uncond 77
    counts, rec, _ = _run_and_verify(tiny_host, dict(prompt=long_prompt, negative_prompt="blurry"))
    lengths = {c.context.shape[1] for c in rec.calls}
    assert 77 in lengths and max(lengths) > 77, lengths


def test_negative_guidance_minimum_sigma_skips_uncond(tiny_host):
    from modules import shared

    # The WebUI restores an override afterwards only for options already in its config data
    # (a fresh config has no s_min_uncond there), so the test puts the option back itself:
    # left at 100 it would change every later plain image.
    before = shared.opts.s_min_uncond
    try:
        # s_min_uncond larger than every sigma: the WebUI skips the uncond rows on alternate steps
        counts, rec, _ = _run_and_verify(tiny_host, dict(prompt="a photo of a cat", negative_prompt="blurry", steps=4,
                                                         override_settings={"s_min_uncond": 100.0}))
    finally:
        tiny_host.set_options(s_min_uncond=before)
    assert shared.opts.s_min_uncond == before
    rows_per_step = {}
    for c in rec.calls:
        rows_per_step.setdefault(c.step, set()).add(c.x.shape[0])
    assert {1} in rows_per_step.values(), f"no step ran without its uncond row: {rows_per_step}"


# Every optimisation of WebUI v1.10.1 that runs on a CPU (xformers needs CUDA), and "None"
# (ldm's own CrossAttention.forward).
OPTIMISATIONS = ["None", "sdp", "sdp-no-mem", "Doggettx", "sub-quadratic", "V1", "InvokeAI"]


@pytest.mark.parametrize("optimisation", OPTIMISATIONS)
def test_attention_optimisations(tiny_host, optimisation):
    from modules import sd_hijack

    titles = {o.name: o.title() for o in sd_hijack.optimizers}
    tiny_host.set_options(cross_attention_optimization=titles.get(optimisation, optimisation))
    try:
        name = sd_hijack.model_hijack.optimization_method
        assert (name or "None") == optimisation, f"the WebUI runs {name!r}"
        _run_and_verify(tiny_host, dict(prompt="a photo of a cat", negative_prompt="blurry", batch_size=2))
    finally:
        tiny_host.set_options(cross_attention_optimization="Automatic")


def test_two_subjects_and_start_end_window(tiny_host):
    """start 0.4 / end 1.0 with 5 steps: the branch acts on steps 2, 3, 4 only."""
    import ssr

    pils, dicts = [], []
    for seed, query in ((0, "the red thing"), (1, "the blue thing")):
        image, unit = _subject(seed, query)
        pils.append((image, query))
        dicts.append(unit)
    payload = dict(prompt="two things", negative_prompt="blurry", steps=5,
                   alwayson_scripts=pl.alwayson(pl.ssr_unit(*dicts, start=0.4, end=1.0)))
    with hostcheck.AttentionRecorder(tiny_host.unet) as rec:
        result = tiny_host.txt2img(**payload)
    assert "SSR error" not in result["info"], result["info"]
    expect = _expectation(tiny_host, pils, active_steps={2, 3, 4})
    counts = hostcheck.verify(rec, tiny_host.unet, expect)
    assert counts["plain"] > 0 and counts["subject"] > 0, counts
    assert expect.tokens.shape[1] == 2 * 462
    assert isinstance(ssr.Subject, type)
