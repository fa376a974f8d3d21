"""TorchScript archives (OpenAI's ``ViT-L-14.pt``) are refused by every loader, recognised from
their zip directory without being loaded, and converted only by ``python -m ssr.convert
--trust-torchscript`` into a safetensors CLIP vision file that the normal loader reads.

Loading a TorchScript archive runs code stored in the file (and on torch < 2.6,
``torch.load(weights_only=True)`` dispatches to ``torch.jit.load`` by itself), so the tests
also check that ``torch.jit.load`` is never reached without the flag.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ssr import convert
from ssr.clip_checkpoints import load_clip_image_encoder
from ssr.files import WeightFileError, is_torchscript_archive, read_state_dict, read_tensor_headers
from ssr.weights import load_ssr_weights
from tests.tiny_models import OpenAIClipLayout, tiny_clip_image_encoder

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # building the archives


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip_image_encoder(seed=7)


@pytest.fixture(scope="module")
def torchscript_clip(tmp_path_factory, encoder):
    """A traced OpenAI-layout CLIP saved with torch.jit.save, under OpenAI's file name."""
    import copy

    module = OpenAIClipLayout(copy.deepcopy(encoder.visual)).eval()
    traced = torch.jit.trace(module, torch.zeros(1, 3, 224, 224), check_trace=False)
    path = str(tmp_path_factory.mktemp("torchscript") / "ViT-L-14.pt")
    torch.jit.save(traced, path)
    return path


@pytest.fixture(scope="module")
def torchscript_small(tmp_path_factory):
    """A tiny scripted module (not CLIP at all)."""
    path = str(tmp_path_factory.mktemp("torchscript_small") / "model.pt")
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.ReLU())), path)
    return path


@pytest.fixture
def no_jit_load(monkeypatch):
    """Fails the test if anything calls torch.jit.load."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.jit.load was called: TorchScript code would run")

    monkeypatch.setattr(torch.jit, "load", refuse)
    return calls


def test_detected_from_the_zip_directory(torchscript_clip, torchscript_small, tmp_path):
    assert is_torchscript_archive(torchscript_clip) and is_torchscript_archive(torchscript_small)
    plain = str(tmp_path / "plain.pt")
    torch.save({"visual.conv1.weight": torch.zeros(2, 3, 14, 14)}, plain)
    assert not is_torchscript_archive(plain)


@pytest.mark.parametrize("reader", [read_state_dict, read_tensor_headers,
                                    lambda p: load_clip_image_encoder(p, expect_width=None), load_ssr_weights])
def test_refused_with_the_file_name_and_how_to_convert(reader, torchscript_clip, torchscript_small, no_jit_load):
    for path in (torchscript_clip, torchscript_small):
        with pytest.raises(WeightFileError) as info:
            reader(path)
        message = str(info.value)
        assert path in message and "TorchScript" in message, message
        assert "runs code" in message and "--trust-torchscript" in message and "convert" in message, message
    assert not no_jit_load


def test_converter_refuses_without_the_flag(torchscript_clip, tmp_path, capsys, no_jit_load):
    out = tmp_path / "clip.safetensors"
    assert convert.main([torchscript_clip, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ViT-L-14.pt" in err and "--trust-torchscript" in err
    assert not out.exists() and not no_jit_load


def test_converter_flag_states_the_risk(capsys):
    with pytest.raises(SystemExit):
        convert.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trust-torchscript" in text and "runs code" in text


def test_converter_flag_converts_to_a_safetensors_clip_file(torchscript_clip, encoder, tmp_path, capsys):
    out = str(tmp_path / "clip_vit_l14.safetensors")
    assert convert.main(["--trust-torchscript", torchscript_clip, "-o", out]) == 0
    assert "clip_vit_l14.safetensors" in capsys.readouterr().out
    shapes, metadata = read_tensor_headers(out)
    assert "visual.conv1.weight" in shapes
    assert not any(k.startswith(("token_embedding", "logit_scale")) for k in shapes)  # text tower dropped
    loaded = load_clip_image_encoder(out, expect_width=None)
    assert loaded.config == encoder.config
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(loaded(pixels), encoder(pixels)):
            assert torch.equal(a, b)


def test_converter_flag_rejects_a_non_clip_archive(torchscript_small, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert convert.main(["--trust-torchscript", torchscript_small, "-o", str(out)]) == 2
    assert "not a CLIP vision" in capsys.readouterr().err and not out.exists()
