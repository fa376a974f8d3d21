"""Learning-rate warm-up and schedules (issue 11 item 11); the paper's constant 5e-5 stays
the default."""
import inspect
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from trainer.lr_schedule import check_schedule, lr_factor  # noqa: E402
from trainer.module import SSRTrainingModule  # noqa: E402


def test_the_defaults_are_the_papers_constant_rate():
    defaults = {k: p.default for k, p in inspect.signature(SSRTrainingModule.__init__).parameters.items()}
    assert defaults["learning_rate"] == 5e-5 and defaults["lr_schedule"] == "constant"
    assert defaults["lr_warmup_steps"] == 0
    assert all(lr_factor(step) == 1.0 for step in (0, 1, 10 ** 6))


def test_warm_up_ramps_linearly_from_the_first_step():
    assert [lr_factor(s, "constant", warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_goes_from_one_to_the_floor_and_stays_there():
    factors = [lr_factor(s, "cosine", warmup_steps=2, total_steps=12, min_factor=0.1) for s in range(16)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # warm-up, then the cosine's start
    assert factors[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert factors[12:] == [pytest.approx(0.1)] * 4
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        check_schedule("linear", 0, 0.0, None)
    with pytest.raises(ValueError, match="lr_min_factor"):
        check_schedule("cosine", 0, 1.5, None)
    with pytest.raises(ValueError, match="more steps"):
        check_schedule("cosine", 10, 0.0, 10)
    with pytest.raises(ValueError, match="length"):
        lr_factor(5, "cosine")
