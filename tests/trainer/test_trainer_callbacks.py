"""EMA arithmetic and weight swapping, and the sample grid layout (no training run needed)."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from trainer.callbacks import EMA, image_grid  # noqa: E402


def fake_trainer(step):
    return SimpleNamespace(global_step=step, strategy=object())


def test_ema_follows_the_warmed_up_average_and_swaps_weights_in_and_out():
    module = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    module[1].requires_grad_(False)  # frozen parameters are not averaged
    ema = EMA(decay=0.9)
    ema.on_fit_start(fake_trainer(0), module)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    expected = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    for step in range(1, 4):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.5 * step)
        ema.on_train_batch_end(fake_trainer(step), module, None, None, 0)
        ema.on_train_batch_end(fake_trainer(step), module, None, None, 1)  # no optimizer step: no update
        decay = min(0.9, step / (9 + step))  # (1 + n) / (10 + n) for update n = step - 1
        for name, p in module.named_parameters():
            if p.requires_grad:
                expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    assert ema.updates == 3
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=1e-6, atol=1e-6)

    raw = {n: p.detach().clone() for n, p in module.named_parameters()}
    with ema.averaged(module):
        torch.testing.assert_close(module[0].weight, expected["0.weight"])
        checkpoint = {"state_dict": {n: p.detach().clone() for n, p in module.named_parameters()}}
        ema.on_save_checkpoint(None, module, checkpoint)  # saved while swapped: raw weights are stored
        torch.testing.assert_close(checkpoint["state_dict"]["0.weight"], raw["0.weight"])
    for name, p in module.named_parameters():
        assert torch.equal(p, raw[name])

    restored = EMA(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    restored.on_fit_start(fake_trainer(3), module)
    assert restored.updates == 3 and torch.equal(restored.shadow["0.weight"], ema.shadow["0.weight"])


def test_disabled_ema_does_nothing():
    module = nn.Linear(2, 2)
    ema = EMA(decay=None)
    ema.on_fit_start(fake_trainer(0), module)
    ema.on_train_batch_end(fake_trainer(1), module, None, None, 0)
    assert not ema.shadow and ema.state_dict()["shadow"] == {}
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)


def test_image_grid_puts_references_in_rows_and_prompts_in_columns():
    rows = [torch.full((3, 3, 4, 5), float(r)) for r in range(2)]  # 2 rows of 3 images, 4x5 px
    rows[1][2] = 7.0
    grid = image_grid(rows)
    assert grid.shape == (3, 2 * 4, 3 * 5)
    assert grid[:, :4].eq(0).all() and grid[:, 4:, :10].eq(1).all() and grid[:, 4:, 10:].eq(7).all()
