"""The training computation (trainer.core) on tiny random models of the real architectures."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_sd  # noqa: E402  (also puts the repository root on sys.path)

from ssr import SubjectEmbedder  # noqa: E402
from ssr.query_encoder import BpeQueryTokenizer, encode_queries  # noqa: E402
from trainer.core import LatentCache  # noqa: E402
from trainer.losses import regularizer_paper, regularizer_reference  # noqa: E402


@pytest.fixture(scope="module")
def shared_core():
    return tiny_sd.tiny_core(seed=0)


@pytest.fixture
def core(shared_core):
    """The module's core with its weights restored after each test (building one takes seconds)."""
    state = {k: v.clone() for k, v in shared_core.state_dict().items()}
    yield shared_core
    shared_core.set_frozen_dtype(torch.float32)
    shared_core.load_state_dict(state)
    shared_core.zero_grad(set_to_none=True)
    shared_core.latent_cache = None
    shared_core.regularizer = "reference"
    shared_core.unet.disable_gradient_checkpointing()
    shared_core.set_subject_context(None)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ssr_grads(core):
    return {n: p.grad.detach().clone() for n, p in core.ssr.named_parameters()}


def test_training_steps_change_only_the_trainable_weights(core):
    frozen_before = {k: v.clone() for k, v in core.state_dict().items() if not k.startswith("ssr.")}
    trainable_before = {k: v.clone() for k, v in core.ssr.state_dict().items()}
    optimizer = torch.optim.AdamW(core.ssr.parameters(), lr=1e-3)
    batch = tiny_sd.tiny_batch(2)
    for step in range(2):
        out = core.losses(batch, gen(step))
        assert all(torch.isfinite(v) for v in out.values())
        assert out["loss"].item() == pytest.approx(out["loss_ldm"].item() + core.tau * out["loss_reg"].item(), rel=1e-6)
        optimizer.zero_grad()
        out["loss"].backward()
        for name, p in core.ssr.named_parameters():  # every trainable tensor gets a gradient
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    assert all(not p.requires_grad and p.grad is None for m in core.frozen_modules() for p in m.parameters())
    for k, v in core.state_dict().items():
        if k.startswith("ssr."):
            assert not torch.equal(v, trainable_before[k[4:]]), f"{k} did not change"
        else:
            assert torch.equal(v, frozen_before[k]), f"frozen {k} changed"


def test_a_few_steps_on_one_batch_reduce_the_loss(core):
    batch = tiny_sd.tiny_batch(2, seed=3)
    optimizer = torch.optim.AdamW(core.ssr.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        out = core.losses(batch, gen(7))  # same latents, timesteps and noise every step
        losses.append(out["loss"].item())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(core.losses(batch, gen(7))["loss"].item())
    assert losses[-1] < 0.95 * losses[0], losses


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(core):
    batch = tiny_sd.tiny_batch(2)
    plain = core.losses(batch, gen())
    plain["loss"].backward()
    expected = ssr_grads(core)
    core.zero_grad(set_to_none=True)
    core.unet.enable_gradient_checkpointing()
    checkpointed = core.losses(batch, gen())
    checkpointed["loss"].backward()
    assert checkpointed["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)
    for name, grad in ssr_grads(core).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in expected.items() if n.startswith("attention."))


def test_the_loss_uses_the_chosen_regulariser_on_the_encoder_outputs(core):
    batch = tiny_sd.tiny_batch(2)
    texts = core.encode_texts(batch["query"])
    with torch.no_grad():
        tokens, scales = core.subject_tokens(texts, batch["clip_pixel_values"])
        reference = core.losses(batch, gen())["loss_reg"]
        core.regularizer = "paper"
        paper = core.losses(batch, gen())["loss_reg"]
    assert reference.item() == pytest.approx(regularizer_reference(scales, texts).item(), rel=1e-6)
    assert paper.item() == pytest.approx(regularizer_paper(tokens, texts).item(), rel=1e-6)


def test_single_scale_feeds_the_last_clip_scale_to_every_scale(core):
    batch = tiny_sd.tiny_batch(2)
    z_q = core.encode_texts(batch["query"])
    with torch.no_grad():
        single, _ = core.subject_tokens(z_q, batch["clip_pixel_values"], single_scale=True)
        multi, _ = core.subject_tokens(z_q, batch["clip_pixel_values"], single_scale=False)
        z = core.image_encoder(batch["clip_pixel_values"])
        expected, _ = core.ssr.encoder(z_q, [z[-1]] * 6)
    torch.testing.assert_close(single, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single, multi)


def test_dropped_subjects_train_exactly_the_unconditional_embedding_inference_uses(core, tiny_jsonl):
    from trainer.data import SubjectDataModule

    data = SubjectDataModule(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root), batch_size=2,
                             num_workers=0, resolution=64, subject_dropout=1.0, prompt_dropout=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["subject_dropped"].all() and batch["query"] == ["", ""]
    assert torch.count_nonzero(batch["clip_pixel_values"]) == 0
    with torch.no_grad():
        tokens, _ = core.subject_tokens(core.encode_texts(batch["query"]), batch["clip_pixel_values"])
    # The inference path: ssr.SubjectEmbedder with the SD text encoder as query encoder.
    tokenizer = BpeQueryTokenizer()
    embedder = SubjectEmbedder(core.image_encoder, core.ssr, lambda texts: encode_queries(core.text_encoder, tokenizer, texts))
    unconditional = embedder.unconditional()
    for row in tokens:
        torch.testing.assert_close(row, unconditional, rtol=1e-5, atol=1e-5)


def test_latent_cache_serves_the_same_latents_and_separates_flipped_views(core, tmp_path):
    batch = tiny_sd.tiny_batch(2)
    uncached = core.encode_latents(batch["pixel_values"], gen(1))
    core.latent_cache = LatentCache("vae-test", memory_items=10, directory=str(tmp_path))
    first = core.encode_latents(batch["pixel_values"], gen(1), batch["key"])
    assert core.latent_cache.misses == 2 and core.latent_cache.hits == 0
    second = core.encode_latents(batch["pixel_values"], gen(1), batch["key"])
    assert core.latent_cache.hits == 2
    torch.testing.assert_close(first, uncached, rtol=0, atol=2e-3)  # fp16 storage
    torch.testing.assert_close(second, first)
    flipped = core.encode_latents(batch["pixel_values"].flip(-1), gen(1), batch["key"])
    assert core.latent_cache.misses == 4 and not torch.allclose(flipped, first, atol=1e-2)
    # A new cache over the same folder (another rank, a later run) reads the files.
    core.latent_cache = LatentCache("vae-test", memory_items=10, directory=str(tmp_path))
    third = core.encode_latents(batch["pixel_values"], gen(1), batch["key"])
    assert core.latent_cache.hits == 2 and core.latent_cache.misses == 0
    torch.testing.assert_close(third, first)


def test_bf16_frozen_models_under_autocast_train(core):
    core.set_frozen_dtype(torch.bfloat16)
    batch = tiny_sd.tiny_batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = core.losses(batch, gen())
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in core.ssr.parameters())


def test_generate_gives_deterministic_images_and_clears_the_context(core):
    batch = tiny_sd.tiny_batch(2)
    args = (batch["clip_pixel_values"], batch["query"], ["a photo", "a photo of a dog"])
    a = core.generate(*args, gen(3), 64, 64, steps=2)
    b = core.generate(*args, gen(3), 64, 64, steps=2)
    assert a.shape == (2, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not core.attention.active and core.attention.scale == 1.0
