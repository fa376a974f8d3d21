"""L_reg leaves out rows whose subject was dropped unless reg_on_dropped_subjects is set
(issue 11 item 10): the unconditional subject embedding is then trained by L_LDM only."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_sd  # noqa: E402

from trainer.losses import regularizer_paper, regularizer_reference  # noqa: E402


def test_row_mask_means_over_the_kept_rows_only():
    g = torch.Generator().manual_seed(0)
    scales = [torch.randn(3, 77, 8, generator=g) for _ in range(6)]
    tokens = torch.randn(3, 462, 8, generator=g)
    z_q = torch.randn(3, 77, 8, generator=g)
    keep = torch.tensor([True, False, True])
    assert regularizer_reference(scales, z_q, keep).item() == pytest.approx(
        regularizer_reference([s[[0, 2]] for s in scales], z_q[[0, 2]]).item(), rel=1e-6)
    assert regularizer_paper(tokens, z_q, keep).item() == pytest.approx(
        regularizer_paper(tokens[[0, 2]], z_q[[0, 2]]).item(), rel=1e-6)
    # different from the mean over all rows: the dropped row really is left out
    assert regularizer_reference(scales, z_q, keep).item() != pytest.approx(regularizer_reference(scales, z_q).item())
    none = torch.zeros(3, dtype=torch.bool)
    assert regularizer_reference(scales, z_q, none).item() == 0.0 and regularizer_paper(tokens, z_q, none).item() == 0.0


@pytest.fixture(scope="module")
def core():
    return tiny_sd.tiny_core(seed=1)


def test_dropped_rows_are_left_out_by_default_and_kept_with_the_option(core):
    batch = tiny_sd.tiny_batch(3)  # row 2 has the "" query of a dropped subject
    assert batch["subject_dropped"].tolist() == [False, False, True]
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        z_q = core.encode_texts(batch["query"])
        tokens, scales = core.subject_tokens(z_q, batch["clip_pixel_values"])
        assert core.reg_on_dropped_subjects is False
        default = core.losses(batch, generator())
        core.reg_on_dropped_subjects = True
        try:
            with_dropped = core.losses(batch, generator())
        finally:
            core.reg_on_dropped_subjects = False
    keep = torch.tensor([True, True, False])
    assert default["loss_reg"].item() == pytest.approx(regularizer_reference(scales, z_q, keep).item(), rel=1e-5)
    assert with_dropped["loss_reg"].item() == pytest.approx(regularizer_reference(scales, z_q).item(), rel=1e-5)
    assert default["loss_ldm"].item() == pytest.approx(with_dropped["loss_ldm"].item(), rel=1e-6)


def test_a_batch_of_dropped_subjects_gets_no_regulariser_gradient(core):
    batch = tiny_sd.tiny_batch(3)
    batch["subject_dropped"] = torch.ones(3, dtype=torch.bool)
    core.zero_grad(set_to_none=True)
    out = core.losses(batch, torch.Generator().manual_seed(0))
    assert out["loss_reg"].item() == 0.0
    out["loss"].backward()  # L_LDM alone still trains the unconditional embedding
    assert core.ssr.encoder.to_q.weight.grad is not None and core.ssr.encoder.to_q.weight.grad.abs().sum() > 0
    core.zero_grad(set_to_none=True)
    core.set_subject_context(None)
