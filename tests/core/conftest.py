"""Fixtures for the core library tests: tiny random models of the real architectures.

Expensive builders are session-scoped; tests that mutate a model take a deep copy.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # `tests.tiny_models` must import however pytest is started
    sys.path.insert(0, ROOT)

from tests import tiny_models as tm  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    """Seeded, and one intra-op thread: these tiny models gain little from a second thread,
    and on a shared 2-core machine oversubscribed OpenMP threads slow everything several-fold."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ldm_unet_pristine():
    return tm.ldm_unet_sd1(seed=11)


@pytest.fixture(scope="session")
def diffusers_unet_pristine():
    return tm.diffusers_unet_sd1(seed=12)


@pytest.fixture(params=["ldm", "diffusers"])
def unet(request, ldm_unet_pristine, diffusers_unet_pristine):
    """A fresh copy of each tiny SD1-layout UNet (ldm UNetModel, diffusers UNet2DConditionModel)."""
    pristine = ldm_unet_pristine if request.param == "ldm" else diffusers_unet_pristine
    return copy.deepcopy(pristine)


@pytest.fixture
def ldm_unet(ldm_unet_pristine):
    return copy.deepcopy(ldm_unet_pristine)


@pytest.fixture(scope="session")
def ssr_weights_tiny():
    """SSR weights for the tiny UNets (context 32) and the tiny CLIP (width 128)."""
    return tm.tiny_ssr_weights(seed=21)


@pytest.fixture(scope="session")
def clip_encoder_tiny():
    return tm.tiny_clip_image_encoder(seed=31)


@pytest.fixture(scope="session")
def text_encoder_tiny():
    return tm.tiny_text_encoder(seed=41)
