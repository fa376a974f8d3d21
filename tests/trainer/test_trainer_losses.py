"""Both forms of the embedding-consistency regulariser against a direct, loop-based computation."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from trainer.losses import DEFAULT_TAU, regularizer_paper, regularizer_reference  # noqa: E402


def cosine(a, b):
    """Plain-Python cosine of two vectors."""
    a, b = a.tolist(), b.tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture
def embeddings():
    g = torch.Generator().manual_seed(0)
    batch, scales, length, dim = 2, 6, 5, 8
    outs = [torch.randn(batch, length, dim, generator=g) for _ in range(scales)]
    z_q = torch.randn(batch, length, dim, generator=g)
    return outs, z_q


def test_reference_form_is_sum_over_scales_of_tokenwise_mean_cosine_distance(embeddings):
    outs, z_q = embeddings
    batch, length, _ = z_q.shape
    expected = 0.0
    for out in outs:
        expected += sum(1 - cosine(out[b, t], z_q[b, t]) for b in range(batch) for t in range(length)) / (batch * length)
    assert regularizer_reference(outs, z_q).item() == pytest.approx(expected, rel=1e-5)


def test_paper_form_is_tokenwise_cosine_distance_of_the_mean_over_scales(embeddings):
    outs, z_q = embeddings
    batch, length, dim = z_q.shape
    subject = torch.cat(outs, dim=1)  # [B, 6*L, D], scale k holds tokens k*L .. k*L+L-1
    expected = 0.0
    for b in range(batch):
        for t in range(length):
            mean = [sum(subject[b, k * length + t, d].item() for k in range(len(outs))) / len(outs) for d in range(dim)]
            expected += 1 - cosine(torch.tensor(mean), z_q[b, t])
    expected /= batch * length
    assert regularizer_paper(subject, z_q).item() == pytest.approx(expected, rel=1e-5)


def test_regularisers_do_not_backpropagate_into_the_query_embedding(embeddings):
    outs, z_q = embeddings
    z_q = z_q.clone().requires_grad_(True)
    outs = [o.clone().requires_grad_(True) for o in outs]
    (regularizer_reference(outs, z_q) + regularizer_paper(torch.cat(outs, 1), z_q)).backward()
    assert z_q.grad is None
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outs)


def test_identical_embeddings_give_zero_and_stated_default_weights():
    z_q = torch.randn(1, 4, 8)
    assert regularizer_reference([z_q.clone() for _ in range(6)], z_q).item() == pytest.approx(0.0, abs=1e-6)
    assert regularizer_paper(torch.cat([z_q] * 6, 1), z_q).item() == pytest.approx(0.0, abs=1e-6)
    assert DEFAULT_TAU == {"reference": 0.1, "paper": 0.01}


def test_paper_form_rejects_a_token_count_that_is_not_whole_scales():
    with pytest.raises(ValueError, match="whole number"):
        regularizer_paper(torch.randn(1, 10, 8), torch.randn(1, 4, 8))
