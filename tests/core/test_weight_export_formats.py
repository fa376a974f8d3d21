"""Writing SSR weights in all three formats (our single file, the official .bin pair, the
safetensors re-export pair) and ``python -m ssr.convert --to ...`` between them.

The expected key layouts come from ``official_tensors`` / ``reexport`` in
test_ssr_weights.py, which spell the released files' keys out by hand, so the writers are
checked against the layout, not against the functions they are built from."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors import safe_open

from ssr.convert import main as convert_main
from ssr.weights import (EXPORT_FORMATS, PAIR_NAMES, WrongFamilyError, export_ssr_weights, load_ssr_weights,
                         save_official_pair, save_reexport_pair)
from tests.core.test_ssr_weights import official_tensors, reexport, write_official
from tests.tiny_models import tiny_ssr_weights


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def sd1_model(seed=3):
    return tiny_ssr_weights(seed, context_dim=768)  # 768: passes the SD1.x family check


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_official_pair_has_the_released_layout_and_loads_without_pickled_code(tmp_path, umask_022):
    model = sd1_model()
    aligner_path, layers_path = save_official_pair(model, str(tmp_path / "official"))
    assert [os.path.basename(aligner_path), os.path.basename(layers_path)] == list(PAIR_NAMES[0])
    aligner = torch.load(aligner_path, weights_only=True)
    layers = torch.load(layers_path, weights_only=True)
    want_aligner, want_layers = official_tensors(context_dim=768, image_dim=model.encoder.config.image_dim,
                                                 inner=model.encoder.config.inner_dim)
    assert set(aligner) == set(want_aligner) and set(layers) == set(want_layers)
    for k, v in {**aligner, **layers}.items():
        assert type(v) is torch.Tensor and v.is_contiguous() and v.dtype == torch.float32, k
    # layer j of the canonical order is official index 2j + 1
    assert torch.equal(layers["1.to_k_SSR.weight"], model.attention[0].to_k.weight)
    assert torch.equal(layers["31.to_v_SSR.weight"], model.attention[15].to_v.weight)
    assert torch.equal(aligner["aligner.processor.to_v.5.weight"], model.encoder.state_dict()["to_v.5.weight"])
    same_weights(load_ssr_weights(str(tmp_path / "official")), model)
    assert mode(aligner_path) == mode(layers_path) == 0o644


def test_reexport_pair_has_the_safetensors_layout(tmp_path, umask_022):
    model = sd1_model()
    paths = save_reexport_pair(model, str(tmp_path / "reexport"), {"steps": "12"})
    assert [os.path.basename(p) for p in paths] == list(PAIR_NAMES[1])
    want_aligner, want_layers = official_tensors(context_dim=768, image_dim=model.encoder.config.image_dim,
                                                 inner=model.encoder.config.inner_dim)
    for path, want in zip(paths, (reexport(want_aligner), want_layers)):
        with safe_open(path, "pt") as f:
            assert set(f.keys()) == set(want)
            assert f.metadata()["format"] == "pt" and f.metadata()["steps"] == "12"
        assert mode(path) == 0o644  # safetensors alone writes 0600
    same_weights(load_ssr_weights(str(tmp_path / "reexport")), model)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_format_round_trips_and_fp16_loads_as_float(tmp_path, fmt):
    model = sd1_model(seed=5)
    output = str(tmp_path / ("w.safetensors" if fmt == "single" else "pair"))
    paths = export_ssr_weights(model, fmt, output)
    assert all(os.path.isfile(p) for p in paths) and len(paths) == (1 if fmt == "single" else 2)
    same_weights(load_ssr_weights(output), model)
    half = export_ssr_weights(sd1_model(seed=5).half(), fmt, str(tmp_path / ("h.safetensors" if fmt == "single" else "half")))
    loaded = load_ssr_weights(half[0])
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k


def test_convert_command_goes_through_every_format_and_back(tmp_path, capsys):
    model = sd1_model(seed=8)
    start = str(tmp_path / "start.safetensors")
    export_ssr_weights(model, "single", start)
    chain = [("official", str(tmp_path / "official")), ("reexport", str(tmp_path / "reexport")),
             ("official", str(tmp_path / "official2")), ("single", str(tmp_path / "end.safetensors"))]
    source = start
    for fmt, output in chain:
        assert convert_main([source, "--to", fmt, "-o", output]) == 0
        assert "wrote" in capsys.readouterr().out
        same_weights(load_ssr_weights(output), model)
        source = output
    # one file of a pair finds its partner; the official .bin files hold nothing but tensors
    assert convert_main([os.path.join(tmp_path, "official", PAIR_NAMES[0][1]), "--to", "reexport",
                         "-o", str(tmp_path / "from_one_file")]) == 0
    same_weights(load_ssr_weights(str(tmp_path / "from_one_file")), model)


def test_convert_refuses_a_file_as_pair_output(tmp_path, capsys):
    start = str(tmp_path / "start.safetensors")
    export_ssr_weights(sd1_model(), "single", start)
    with pytest.raises(SystemExit):
        convert_main([start, "--to", "official", "-o", str(tmp_path / "x.safetensors")])
    assert "must be a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main([start, "-o", str(tmp_path / "folder")])
    assert "must end in .safetensors" in capsys.readouterr().err


def test_tiny_weights_need_the_any_family_flag_and_get_a_warning(tmp_path, capsys):
    tiny = tiny_ssr_weights(2)  # 32-wide text context: no SD family
    aligner, layers = save_official_pair(tiny, str(tmp_path / "tiny"))
    with pytest.raises(WrongFamilyError):
        load_ssr_weights(str(tmp_path / "tiny"))
    out = str(tmp_path / "tiny.safetensors")
    assert convert_main([str(tmp_path / "tiny"), "-o", out]) == 2
    err = capsys.readouterr().err
    assert "32-wide text context" in err and "--any-family" in err and not os.path.exists(out)

    assert convert_main([str(tmp_path / "tiny"), "-o", out, "--any-family"]) == 0
    err = capsys.readouterr().err
    assert "warning: --any-family" in err and "32-wide text context" in err
    same_weights(load_ssr_weights(out, expect_family=None), tiny)
    # SD1.x weights convert with the flag too, without a warning
    write_official(str(tmp_path / "sd1"), *official_tensors())
    assert convert_main([str(tmp_path / "sd1"), "-o", str(tmp_path / "sd1.safetensors"), "--any-family"]) == 0
    assert "warning" not in capsys.readouterr().err
