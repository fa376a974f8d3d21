"""SSR weight files (ssr.weights, ssr.convert): every format loads to the same tensors, and
every bad file gives a WeightFileError that names the file.

The official key layouts are written out here from docs/method.md (sections 4 and 6), not
taken from ssr.weights. Tiny shapes (SD1 layer structure, 768-dim context so the SD1.x
family check applies) keep files small; one test uses the real SD1.5 shapes.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssr import convert
from ssr.files import WeightFileError
from ssr.weights import SSRWeights, load_ssr_weights, save_ssr_weights
from tests.tiny_models import TINY_SD1_WIDTHS

SD15_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)


def official_tensors(context_dim=768, image_dim=128, inner=64, widths=TINY_SD1_WIDTHS, seed=0):
    """(pytorch_model.bin dict, pytorch_model_1.bin dict) in the released key layout."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    aligner = {"aligner.to_q.weight": r(inner, context_dim), "aligner.to_k.weight": r(inner, image_dim)}
    for k in range(6):
        aligner[f"aligner.processor.to_v.{k}.weight"] = r(inner, image_dim)
        aligner[f"aligner.processor.to_out.{k}.weight"] = r(context_dim, inner)
    aligner["norm.weight"], aligner["norm.bias"] = r(context_dim), r(context_dim)
    layers = {}
    for j, width in enumerate(widths):
        layers[f"{2 * j + 1}.to_k_SSR.weight"] = r(width, context_dim)
        layers[f"{2 * j + 1}.to_v_SSR.weight"] = r(width, context_dim)
    return aligner, layers


def reexport(aligner):
    """ssr_aligner.safetensors keys: the official ones without `aligner.` / `aligner.processor.`."""
    out = {}
    for k, v in aligner.items():
        for prefix in ("aligner.processor.", "aligner."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def write_official(folder, aligner, layers, legacy=False):
    os.makedirs(folder, exist_ok=True)
    kw = {"_use_new_zipfile_serialization": False} if legacy else {}
    torch.save(aligner, os.path.join(folder, "pytorch_model.bin"), **kw)
    torch.save(layers, os.path.join(folder, "pytorch_model_1.bin"), **kw)
    return str(folder)


def write_reexport(folder, aligner, layers):
    os.makedirs(folder, exist_ok=True)
    save_file(reexport(aligner), os.path.join(folder, "ssr_aligner.safetensors"))
    save_file(layers, os.path.join(folder, "ssr_attentions.safetensors"))
    return str(folder)


def assert_holds(model: SSRWeights, aligner, layers, cast=lambda t: t):
    """The loaded model holds exactly the official tensors, each in its right place."""
    enc = model.encoder
    assert torch.equal(enc.to_q.weight, cast(aligner["aligner.to_q.weight"]))
    assert torch.equal(enc.to_k.weight, cast(aligner["aligner.to_k.weight"]))
    for k in range(6):
        assert torch.equal(enc.to_v[k].weight, cast(aligner[f"aligner.processor.to_v.{k}.weight"]))
        assert torch.equal(enc.to_out[k].weight, cast(aligner[f"aligner.processor.to_out.{k}.weight"]))
    assert torch.equal(enc.norm.weight, cast(aligner["norm.weight"])) and torch.equal(enc.norm.bias, cast(aligner["norm.bias"]))
    assert len(model.attention) == len(layers) // 2
    for j, kv in enumerate(model.attention):
        assert torch.equal(kv.to_k.weight, cast(layers[f"{2 * j + 1}.to_k_SSR.weight"])), j
        assert torch.equal(kv.to_v.weight, cast(layers[f"{2 * j + 1}.to_v_SSR.weight"])), j
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.encoder.config.heads == 8 and model.family == "sd1"


@pytest.fixture(scope="module")
def tensors():
    return official_tensors()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tensors):
    aligner, layers = tensors
    root = tmp_path_factory.mktemp("ssr_weights")
    official = write_official(root / "official", aligner, layers)
    legacy = write_official(root / "legacy", aligner, layers, legacy=True)
    reexported = write_reexport(root / "reexport", aligner, layers)
    single = str(root / "ssr_sd15.safetensors")
    save_ssr_weights(load_ssr_weights(official), single)
    return {"official": official, "legacy": legacy, "reexport": reexported, "single": single}


# ----------------------------------------------------------------------------- good files

@pytest.mark.parametrize("fmt", ["official", "legacy", "reexport"])
def test_pair_formats_load_from_folder_files_or_either_file(files, tensors, fmt):
    folder = files[fmt]
    names = sorted(os.listdir(folder))
    aligner_name = [n for n in names if n in ("pytorch_model.bin", "ssr_aligner.safetensors")][0]
    layer_name = [n for n in names if n != aligner_name][0]
    a, l = os.path.join(folder, aligner_name), os.path.join(folder, layer_name)
    for source in (folder, [a, l], [l, a], a, l):  # folder, explicit pair, one file finds its partner
        model = load_ssr_weights(source)
        assert_holds(model, *tensors)
    assert aligner_name in model.metadata["source"] and layer_name in model.metadata["source"]


def test_single_file_round_trip(files, tensors):
    model = load_ssr_weights(files["single"])
    assert_holds(model, *tensors)
    meta = model.metadata
    assert meta["format"] == "ssr-encoder" and meta["base"] == "sd1" and meta["layers"] == "16"
    assert meta["widths"] == ",".join(map(str, TINY_SD1_WIDTHS)) and meta["heads"] == "8"
    stored = load_file(files["single"])
    assert all(v.dtype == torch.float32 for v in stored.values())
    assert not any(k.endswith(".tmp") for k in os.listdir(os.path.dirname(files["single"])))


def test_every_format_gives_identical_state_dicts(files):
    models = [load_ssr_weights(files[f]) for f in ("official", "legacy", "reexport", "single")]
    reference = models[0].state_dict()
    for m in models[1:]:
        sd = m.state_dict()
        assert sd.keys() == reference.keys() and all(torch.equal(sd[k], reference[k]) for k in sd)


def test_real_sd15_shapes(tmp_path):
    aligner, layers = official_tensors(context_dim=768, image_dim=1024, inner=512, widths=SD15_WIDTHS, seed=1)
    model = load_ssr_weights(write_reexport(tmp_path / "sd15", aligner, layers))
    default = SSRWeights()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    assert_holds(model, aligner, layers)
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_att = sum(p.numel() for p in model.attention.parameters())
    assert abs(n_enc / 1e6 - 6.4) < 0.1 and abs(n_att / 1e6 - 19.2) < 0.2  # docs/method.md: ~6.4 M + ~19.2 M


def test_convert_cli(files, tensors, tmp_path, capsys):
    out = str(tmp_path / "converted.safetensors")
    assert convert.main([files["official"], "-o", out]) == 0
    assert "converted.safetensors" in capsys.readouterr().out
    assert_holds(load_ssr_weights(out), *tensors)
    # both files of a pair, stored as fp16: loads as fp32 holding the fp16-rounded values
    half = str(tmp_path / "half.safetensors")
    folder = files["reexport"]
    pair = [os.path.join(folder, "ssr_aligner.safetensors"), os.path.join(folder, "ssr_attentions.safetensors")]
    assert convert.main(pair + ["-o", half, "--half", "--source", "my export"]) == 0
    assert all(v.dtype == torch.float16 for v in load_file(half).values())
    assert os.path.getsize(half) < 0.6 * os.path.getsize(out)
    model = load_ssr_weights(half)
    assert_holds(model, *tensors, cast=lambda t: t.half().float())
    assert model.metadata["source"] == "my export"
    # our own file re-written
    again = str(tmp_path / "again.safetensors")
    assert convert.main([out, "-o", again]) == 0
    assert_holds(load_ssr_weights(again), *tensors)


def test_convert_cli_errors(tmp_path, capsys):
    bad = tmp_path / "broken.bin"
    bad.write_text("not weights")
    assert convert.main([str(bad), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "broken.bin" in err and "error" in err
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SystemExit):
        convert.main([str(bad), "-o", str(tmp_path / "x.bin")])  # output must be .safetensors
    assert ".safetensors" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad files

def expect_error(source, file_name, *patterns):
    with pytest.raises(WeightFileError) as info:
        load_ssr_weights(source)
    message = str(info.value)
    assert file_name in message, message
    for p in patterns:
        assert p in message, f"{p!r} not in {message!r}"
    return message


def test_missing_keys(tmp_path, tensors):
    aligner, layers = tensors
    no_norm_bias = {k: v for k, v in aligner.items() if k != "norm.bias"}
    folder = write_official(tmp_path / "a", no_norm_bias, layers)
    expect_error(folder, "pytorch_model.bin", "missing", "norm.bias")
    no_v31 = {k: v for k, v in layers.items() if k != "31.to_v_SSR.weight"}
    folder = write_official(tmp_path / "b", aligner, no_v31)
    expect_error(folder, "pytorch_model_1.bin", "missing", "15.to_v.weight")
    no_layer5 = {k: v for k, v in layers.items() if not k.startswith("5.")}
    folder = write_reexport(tmp_path / "c", aligner, no_layer5)
    expect_error(folder, "ssr_attentions.safetensors", "missing layers [5]")
    no_last = {k: v for k, v in layers.items() if not k.startswith("31.")}
    folder = write_reexport(tmp_path / "d", aligner, no_last)
    expect_error(folder, "ssr_attentions.safetensors", "15 layers", "16")


def test_unexpected_keys(tmp_path, tensors, files):
    aligner, layers = tensors
    folder = write_official(tmp_path / "a", {**aligner, "aligner.extra.weight": torch.zeros(2)}, layers)
    expect_error(folder, "pytorch_model.bin", "unexpected", "extra.weight")
    folder = write_official(tmp_path / "b", aligner, {**layers, "2.to_k_SSR.weight": torch.zeros(32, 768)})
    expect_error(folder, "pytorch_model_1.bin", "unexpected keys", "2.to_k_SSR.weight")
    sd = load_file(files["single"])
    path = str(tmp_path / "stray.safetensors")
    save_file({**sd, "lora.weight": torch.zeros(1)}, path, metadata={"format": "ssr-encoder", "format_version": "1"})
    expect_error(path, "stray.safetensors", "unexpected keys", "lora.weight")


def test_wrong_shapes(tmp_path, tensors):
    aligner, layers = tensors
    folder = write_official(tmp_path / "a", aligner, {**layers, "3.to_v_SSR.weight": torch.zeros(40, 768)})
    expect_error(folder, "pytorch_model_1.bin", "wrong tensor shapes", "(40, 768)", "(32, 768)")
    bad_out = {**aligner, "aligner.processor.to_out.2.weight": torch.zeros(768, 63)}
    folder = write_official(tmp_path / "b", bad_out, layers)
    expect_error(folder, "pytorch_model.bin", "wrong tensor shapes", "(768, 63)")


def test_truncated_safetensors(tmp_path, files):
    data = open(files["single"], "rb").read()
    for name, cut in (("cut_data.safetensors", len(data) // 2), ("cut_header.safetensors", 40)):
        path = tmp_path / name
        path.write_bytes(data[:cut])
        expect_error(str(path), name, "truncated")


def test_truncated_bin(tmp_path, files):
    folder = tmp_path / "pair"
    folder.mkdir()
    data = open(os.path.join(files["official"], "pytorch_model.bin"), "rb").read()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    (folder / "pytorch_model_1.bin").write_bytes(open(os.path.join(files["official"], "pytorch_model_1.bin"), "rb").read())
    expect_error(str(folder), "pytorch_model.bin", "truncated")


@pytest.mark.parametrize("name", ["ssr_sd15.safetensors", "pytorch_model.bin", "model.ckpt"])
def test_text_file_with_weight_name(tmp_path, name):
    path = tmp_path / name
    path.write_text("<html>404 Not Found</html>\n" * 10)
    expect_error(str(path), name)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_error(str(empty), "empty.safetensors", "empty")
    expect_error(str(tmp_path / "nope.safetensors"), "nope.safetensors", "not found")
    (tmp_path / "folder").mkdir()
    expect_error(str(tmp_path / "folder"), "folder", "no SSR weight pair")


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): a stand-in for malicious pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_with_code_is_refused(tmp_path, tensors):
    aligner, layers = tensors
    marker = str(tmp_path / "code_ran")
    folder = tmp_path / "evil"
    write_official(folder, aligner, layers)
    torch.save({**aligner, "payload": _RunsCode(marker)}, str(folder / "pytorch_model.bin"))
    message = expect_error(str(folder), "pytorch_model.bin", "pickled", "refused")
    assert "weights_only` set to `False`" not in message  # never advise the unsafe load
    assert not os.path.exists(marker), "unpickling executed code"


def test_header_scan_says_what_a_pickle_with_objects_is_and_what_to_do(tmp_path, tensors):
    """The model scan reads headers only; a pickled object besides tensors is named, and the
    message says why it is refused and what to use instead, without running its code."""
    from ssr.files import WeightFileError, read_tensor_headers

    aligner, _ = tensors
    marker = str(tmp_path / "code_ran")
    path = tmp_path / "pytorch_model.bin"
    torch.save({**aligner, "payload": _RunsCode(marker)}, str(path))
    with pytest.raises(WeightFileError) as e:
        read_tensor_headers(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ") and ("posix.mkdir" in message or "os.mkdir" in message), message
    assert "refused" in message and ".safetensors" in message and "NoneType" not in message, message
    assert not os.path.exists(marker), "unpickling executed code"


def family_message(family, context_dim):
    return f"these SSR weights are for {family}, {context_dim}-wide text context; SD1.x weights are needed"


def assert_no_shapes(message):
    """The family is the whole story: no tensor shapes or key lists for the user to decode."""
    assert "(" not in message.split(": ", 1)[1] and "[" not in message, message


@pytest.mark.parametrize("context_dim, family", [(1024, "SD2.x"), (2048, "SDXL")])
def test_other_family_weights_say_so(tmp_path, context_dim, family):
    aligner, layers = official_tensors(context_dim=context_dim, seed=2)
    folder = write_reexport(tmp_path / family, aligner, layers)
    assert_no_shapes(expect_error(folder, "ssr_aligner.safetensors", family_message(family, context_dim)))
    folder = write_official(tmp_path / (family + "_bin"), aligner, layers)
    assert_no_shapes(expect_error(folder, "pytorch_model.bin", family_message(family, context_dim)))
    # our single file of that family
    single = str(tmp_path / f"{family}.safetensors")
    save_ssr_weights(load_ssr_weights(folder, expect_family=None), single)
    assert_no_shapes(expect_error(single, f"{family}.safetensors", family_message(family, context_dim)))
    # and the checks are off when the caller asks for any family
    assert load_ssr_weights(folder, expect_family=None).attention.context_dim == context_dim


@pytest.mark.parametrize("sd2_half", ["aligner", "layers"])
def test_pair_with_one_sd2_half_names_that_file(tmp_path, tensors, sd2_half):
    """One half SD1, the other SD2 (mixed downloads): the SD2 file is named, no shapes."""
    aligner, layers = tensors
    aligner2, layers2 = official_tensors(context_dim=1024, seed=3)
    if sd2_half == "aligner":
        folder, name = write_official(tmp_path / "mix", aligner2, layers), "pytorch_model.bin"
    else:
        folder, name = write_official(tmp_path / "mix", aligner, layers2), "pytorch_model_1.bin"
    message = expect_error(folder, name, family_message("SD2.x", 1024))
    assert_no_shapes(message)
    assert os.path.join(folder, name) in message


def test_lone_half_of_a_pair(tmp_path, tensors):
    aligner, layers = tensors
    lone = tmp_path / "aligner_only"
    lone.mkdir()
    torch.save(aligner, str(lone / "pytorch_model.bin"))
    expect_error(str(lone / "pytorch_model.bin"), "pytorch_model.bin", "only the aligner half", "pytorch_model_1.bin")
    expect_error(str(lone), "aligner_only", "no SSR weight pair")
    lone = tmp_path / "layers_only"
    lone.mkdir()
    save_file(layers, str(lone / "ssr_attentions.safetensors"))
    expect_error(str(lone / "ssr_attentions.safetensors"), "ssr_attentions.safetensors", "only the layers half")


def test_two_files_of_the_same_kind(tmp_path, files):
    a = os.path.join(files["official"], "pytorch_model.bin")
    b = os.path.join(files["reexport"], "ssr_aligner.safetensors")
    expect_error([a, b], "ssr_aligner.safetensors", "two aligner files")


def test_not_an_ssr_file(tmp_path):
    path = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(path))
    expect_error(str(path), "some_lora.safetensors", "not an SSR-Encoder weight file")


def test_newer_single_file_format_is_refused(tmp_path, files):
    sd = load_file(files["single"])
    path = str(tmp_path / "future.safetensors")
    save_file(sd, path, metadata={"format": "ssr-encoder", "format_version": "99"})
    expect_error(path, "future.safetensors", "newer")


def test_webui_safe_loader_refusal_is_explained(tmp_path, tensors, monkeypatch, capsys):
    """Under the WebUI, torch.load is the host's restricted loader: for a pickle it refuses it
    prints an error and returns None (a stand-in with that behaviour, written from it)."""
    aligner, layers = tensors
    folder = write_official(tmp_path / "pair", aligner, layers)

    def webui_safe_load(filename, *args, **kwargs):
        print(f"Error verifying pickled file from {filename}: ...", file=sys.stderr)
        return None

    webui_safe_load.__module__ = "modules.safe"
    monkeypatch.setattr(torch, "load", webui_safe_load)
    message = expect_error(folder, "pytorch_model.bin", "the WebUI's safe loader refused this pickle file",
                           "objects other than tensors", ".safetensors", "convert.py", "download the safetensors version")
    assert "NoneType" not in message


def test_torch_21_typed_storage_warning_is_not_shown(tmp_path, tensors, monkeypatch):
    """torch 2.1 (the WebUI's) warns 'TypedStorage is deprecated' from inside
    torch.load(weights_only=True) for every file; users must not see it (it is torch's own
    internals, nothing they can act on). Simulated here on newer torch."""
    import warnings

    aligner, layers = tensors
    folder = write_official(tmp_path / "pair", aligner, layers)
    real_load = torch.load

    def torch21_load(*args, **kwargs):
        warnings.warn("TypedStorage is deprecated. It will be removed in the future and UntypedStorage will be "
                      "the only storage class.", UserWarning)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", torch21_load)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_ssr_weights(folder)
    assert not [w for w in seen if "TypedStorage" in str(w.message)]
