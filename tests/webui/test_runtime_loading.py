"""Issue 9, item 11: the first SSR generation loads CLIP vision and the SSR weights, which
takes seconds; the runtime says so on the console and in the WebUI's progress text
(``shared.state.textinfo``, restored afterwards), with the time it took, and that later runs
reuse it. Tiny weight files in the real formats; the WebUI's ``modules`` is a stand-in here."""
from __future__ import annotations

import re
import sys
import types
from types import SimpleNamespace

import pytest

import ssr
from ssr_webui import runtime as rt
from ssr_webui.model_files import ModelFile
from tests import tiny_models as tm


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ssr_path = root / "tiny_ssr.safetensors"
    ssr.save_ssr_weights(tm.tiny_ssr_weights(seed=3, context_dim=32, image_dim=tm.TINY_CLIP_WIDTH), str(ssr_path))
    clip_dir = root / "tiny-clip-vit"
    tm.tiny_hf_clip_vision(seed=5).save_pretrained(str(clip_dir))
    return (ModelFile("tiny_ssr.safetensors", str(ssr_path), "ssr", (str(ssr_path),)),
            ModelFile("clip_vision/tiny-clip-vit", str(clip_dir), "clip",
                      tuple(str(p) for p in sorted(clip_dir.iterdir()))))


@pytest.fixture
def webui_state(monkeypatch):
    """A stand-in for ``modules.shared.state`` while a generation is running."""
    state = SimpleNamespace(textinfo="Sampling", interrupted=False, skipped=False)
    modules = types.ModuleType("modules")
    modules.shared = SimpleNamespace(state=state, opts=SimpleNamespace())
    monkeypatch.setitem(sys.modules, "modules", modules)
    return state


def test_first_load_is_announced_with_its_time_and_later_loads_are_silent(tiny_files, webui_state, capsys, monkeypatch):
    ssr_file, clip_file = tiny_files
    seen = []
    for name in ("load_ssr_weights", "load_clip_image_encoder"):
        real = getattr(ssr, name)
        monkeypatch.setattr(ssr, name, lambda *a, _real=real, **k: seen.append(webui_state.textinfo) or _real(*a, **k))
    runtime = rt.SSRRuntime()

    weights = runtime.ssr_weights(ssr_file)
    out = capsys.readouterr().out
    assert "[SSR-Encoder] loading SSR weights tiny_ssr.safetensors (first use; later runs reuse it)" in out
    assert re.search(r"\[SSR-Encoder\] SSR weights tiny_ssr\.safetensors loaded in \d+\.\d s", out)

    runtime.clip_encoder(clip_file, weights.encoder.config.image_dim)
    out = capsys.readouterr().out
    assert "[SSR-Encoder] loading CLIP vision clip_vision/tiny-clip-vit (first use; later runs reuse it)" in out
    assert re.search(r"\[SSR-Encoder\] CLIP vision clip_vision/tiny-clip-vit loaded in \d+\.\d s", out)

    # the UI's progress text said what was loading, and is back to what it was
    assert seen == ["SSR-Encoder: loading SSR weights tiny_ssr.safetensors (first use)...",
                    "SSR-Encoder: loading CLIP vision clip_vision/tiny-clip-vit (first use)..."]
    assert webui_state.textinfo == "Sampling"

    runtime.ssr_weights(ssr_file)  # cached: nothing to say
    runtime.clip_encoder(clip_file, weights.encoder.config.image_dim)
    assert capsys.readouterr().out == ""


def test_failed_load_says_so_and_restores_the_progress_text(tmp_path, webui_state, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a weight file")
    with pytest.raises(Exception):
        rt.SSRRuntime().ssr_weights(ModelFile("broken.safetensors", str(broken), "ssr", (str(broken),)))
    out = capsys.readouterr().out
    assert "loading SSR weights broken.safetensors (first use" in out
    assert re.search(r"loading SSR weights broken\.safetensors failed after \d+\.\d s", out)
    assert webui_state.textinfo == "Sampling"


def test_outside_the_webui_only_the_console_is_told(tiny_files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "modules", None)  # `from modules import shared` fails
    rt.SSRRuntime().ssr_weights(tiny_files[0])
    assert "loaded in" in capsys.readouterr().out
