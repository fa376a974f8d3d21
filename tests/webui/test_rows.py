"""RowRouter on hand-built UNet calls of every CFG row layout (docs/webui-host-notes.md, section 6).

The real WebUI's denoiser layouts are exercised end to end in tests/realhost/test_rows.py; here
each layout is spelled out so a failure names the layout."""
import torch

from ssr_webui.rows import SUBJECT, UNCONDITIONAL, RowRouter, controlnet_marks, rows_matching

S, U = SUBJECT, UNCONDITIONAL
D = 8


def texts(n, tokens=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, tokens, D, generator=g)


def router_for(cond, uncond):
    router = RowRouter()
    router.begin_step(cond, uncond)
    return router


def test_single_call_batch_of_two():
    cond, uncond = texts(2, seed=1), texts(2, seed=2)
    router = router_for(cond, uncond)
    assert router.route(torch.cat([cond, uncond])) == [S, S, U, U]
    assert router.decisions["match"] == 4


def test_and_prompt_chunks_mixing_cond_and_uncond():
    # batch 2, image 0 has 2 sub-prompts, image 1 has 1: cond rows 3, uncond rows 2, chunks of batch_size=2
    cond, uncond = texts(3, seed=1), texts(2, seed=2)
    rows = torch.cat([cond, uncond])
    router = router_for(cond, uncond)
    got = router.route(rows[0:2]) + router.route(rows[2:4]) + router.route(rows[4:5])
    assert got == [S, S, S, U, U]


def test_identical_prompt_and_negative_prompt_fall_back_to_position():
    same = texts(2, seed=3)
    router = router_for(same, same.clone())
    assert router.route(torch.cat([same, same])) == [S, S, U, U]
    assert router.decisions["position"] == 4
    # chunked: the running count carries over between calls of one step
    router.begin_step(same, same.clone())
    assert router.route(same[:1]) + router.route(torch.cat([same[1:], same[:1]])) + router.route(same[1:]) == [S, S, U, U]


def test_skipped_uncond_is_cond_only():
    cond, uncond = texts(2, seed=1), texts(2, seed=2)
    assert router_for(cond, uncond).route(cond) == [S, S]


def test_longer_prompt_in_its_own_calls_then_uncond():
    cond, uncond = texts(2, tokens=154, seed=1), texts(2, tokens=77, seed=2)
    router = router_for(cond, uncond)
    assert router.route(cond) == [S, S]
    assert router.route(uncond) == [U, U]


def test_uncond_padded_with_empty_prompt_chunks_after_the_callback():
    cond, uncond = texts(1, tokens=154, seed=1), texts(1, tokens=77, seed=2)
    padded = torch.cat([uncond, texts(1, tokens=77, seed=9)], dim=1)  # pad_cond_uncond
    assert router_for(cond, uncond).route(torch.cat([cond, padded])) == [S, U]


def test_uncond_truncated_by_v0_padding():
    cond, uncond = texts(1, tokens=77, seed=1), texts(1, tokens=154, seed=2)
    assert router_for(cond, uncond).route(torch.cat([cond, uncond[:, :77]])) == [S, U]


def test_context_cast_to_the_unet_dtype():
    cond, uncond = texts(2, seed=1), texts(2, seed=2)
    context = torch.cat([cond, uncond]).half()
    assert router_for(cond, uncond).route(context) == [S, S, U, U]
    assert rows_matching(context, cond).tolist() == [True, True, False, False]


def test_controlnet_marker_rows_decide():
    cond, uncond = texts(2, tokens=78, seed=1), texts(2, tokens=78, seed=2)
    cond[:, 0] = 1024.0
    uncond[:, 0] = -1024.0
    context = torch.cat([uncond[:1], cond, uncond[1:]])  # any order: the marker decides
    assert controlnet_marks(context) == [False, True, True, False]
    router = router_for(None, None)
    assert router.route(context) == [U, S, S, U]
    assert router.decisions["marker"] == 4
    assert controlnet_marks(texts(2)) is None


def test_extra_calls_after_the_steps_rows():
    cond, uncond = texts(1, seed=1), texts(1, seed=2)
    router = router_for(cond, uncond)
    router.route(torch.cat([cond, uncond]))
    assert router.route(uncond) == [U]  # e.g. a guidance extension's extra uncond call
    assert router.route(texts(1, seed=7)) == [None]  # an unknown context: no branch
    same = texts(1, seed=4)
    router.begin_step(same, same.clone())
    router.route(torch.cat([same, same]))
    assert router.route(same) == [U]


def test_rewritten_context_uses_position_inside_the_step():
    cond, uncond = texts(2, seed=1), texts(2, seed=2)
    other = texts(4, seed=5)  # another extension replaced every row
    assert router_for(cond, uncond).route(other) == [S, S, U, U]


def test_outside_a_step_no_branch():
    router = RowRouter()
    assert router.route(texts(3)) == [None, None, None]
    router.begin_step(texts(1), texts(1, seed=1))
    router.end_step()
    assert router.route(texts(2)) == [None, None]
    assert router.route(None) == []


def test_dict_conds_use_crossattn():
    cond, uncond = texts(1, seed=1), texts(1, seed=2)
    router = router_for({"crossattn": cond, "vector": torch.zeros(1, 4)}, {"crossattn": uncond, "vector": torch.zeros(1, 4)})
    assert router.route(torch.cat([uncond, cond])) == [U, S]
