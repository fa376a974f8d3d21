"""Fixtures for the WebUI extension tests: the stand-in WebUI with this extension loaded
(helpers in ssr_webui_testenv.py), and tiny random weights saved in the real formats under a
tmp ``models/`` folder:

    models/ssr_encoder/tiny_ssr.safetensors            our single file
    models/ssr_encoder/official/pytorch_model.bin      the official pair (+ pytorch_model_1.bin)
    models/ssr_encoder/notes.bin                       not a weight file (listed as ignored)
    models/clip_vision/tiny-clip-vit/                  a Hugging Face CLIPVisionModel folder

Sizes match the stand-in's ``tiny_sd.make_tiny_sd_model()`` (context 32, widths 32/64/128).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from ssr_webui_testenv import CLIP, SINGLE, hooks_left, script_callbacks, scripts, shared, start, tiny_sd

import ssr
from modules import paths
from ssr.weights import official_state_dicts
from tests import tiny_models as tm


@pytest.fixture(scope="session")
def weight_files(tmp_path_factory):
    models = tmp_path_factory.mktemp("webui") / "models"
    ssr_dir = models / "ssr_encoder"
    (ssr_dir / "official").mkdir(parents=True)
    weights = tm.tiny_ssr_weights(seed=3, context_dim=32, image_dim=tm.TINY_CLIP_WIDTH)
    ssr.save_ssr_weights(weights, str(ssr_dir / SINGLE))
    aligner, layers = official_state_dicts(tm.tiny_ssr_weights(seed=4, context_dim=32, image_dim=tm.TINY_CLIP_WIDTH))
    torch.save(aligner, str(ssr_dir / "official" / "pytorch_model.bin"))
    torch.save(layers, str(ssr_dir / "official" / "pytorch_model_1.bin"))
    (ssr_dir / "notes.bin").write_bytes(b"not a weight file")
    tm.tiny_hf_clip_vision(seed=5).save_pretrained(str(models / CLIP))
    return SimpleNamespace(models_path=str(models), single=str(ssr_dir / SINGLE), clip_dir=str(models / CLIP))


@pytest.fixture(scope="session")
def sd_model_pristine():
    return tiny_sd.make_tiny_sd_model()


@pytest.fixture(scope="session")
def _session_models_path(weight_files):
    patch = pytest.MonkeyPatch()
    patch.setattr(paths, "models_path", weight_files.models_path)
    yield weight_files.models_path
    patch.undo()


@pytest.fixture
def models_path(_session_models_path, monkeypatch):
    monkeypatch.setattr(paths, "models_path", _session_models_path)  # restored after tests that change it
    return _session_models_path


_CURRENT = {}  # the WebUI started by the `webui` fixture


@pytest.fixture
def webui(models_path, sd_model_pristine):
    """The stand-in WebUI with this extension loaded on a copy of the tiny SD1 model. Started once and
    reused while tests leave it as they found it (starting costs seconds on the test machines)."""
    env = _CURRENT.get("env")
    if env is None or scripts.scripts_txt2img is not env.txt2img or shared.sd_model is not env.model:
        env = _CURRENT["env"] = start(copy.deepcopy(sd_model_pristine))
    added = []
    env.on = lambda kind, fn: (getattr(script_callbacks, "on_" + kind)(fn), added.append(fn))
    yield env
    for fn in added:
        script_callbacks.remove_callbacks_for_function(fn)
    if hooks_left(env.unet) or env.runtime.active is not None:
        _CURRENT.clear()  # a test left hooks behind on purpose: start afresh next time


@pytest.fixture(scope="session")
def core_embedder(weight_files, sd_model_pristine):
    """The core library's own encoder for the test weights: what generation must use (the reference)."""
    from ssr.query_encoder import encode_query_tokens, hf_query_tokens

    weights = ssr.load_ssr_weights(weight_files.single, expect_family=None)
    clip = ssr.load_clip_image_encoder(weight_files.clip_dir, expect_width=weights.encoder.config.image_dim)
    wrapped = copy.deepcopy(sd_model_pristine.cond_stage_model.wrapped)

    def encode_text(texts):
        with torch.no_grad():
            return encode_query_tokens(wrapped.transformer, hf_query_tokens(wrapped.tokenizer, texts))

    return ssr.SubjectEmbedder(clip, weights, encode_text)

