"""Generation errors reach the infotext ("SSR error"), the comments (the API's ``info``), the
console and the UI toast; they name files relative to the models folder, never by absolute
server paths (as the /ssr/* routes do). Host-free: ``modules.paths`` is a stand-in pointing
at a temporary WebUI folder, the processing object a stand-in with the attributes the
runtime uses."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
from PIL import Image

import ssr
from ssr_webui import infotext
from ssr_webui import runtime as rt
from tests import tiny_models as tm


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A WebUI folder with models/ssr_encoder (one usable and one truncated file),
    models/clip_vision and sd-webui-controlnet's clip_vision download folder."""
    root = tmp_path / "server" / "stable-diffusion-webui"
    models = root / "models"
    (models / "ssr_encoder").mkdir(parents=True)
    (models / "clip_vision").mkdir()
    controlnet = root / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "clip_vision"
    controlnet.mkdir(parents=True)
    ssr.save_ssr_weights(tm.tiny_ssr_weights(seed=1, context_dim=32), str(models / "ssr_encoder" / "good.safetensors"))
    data = (models / "ssr_encoder" / "good.safetensors").read_bytes()
    (models / "ssr_encoder" / "cut.safetensors").write_bytes(data[: len(data) // 2])
    modules = types.ModuleType("modules")
    modules.paths = SimpleNamespace(models_path=str(models), extensions_dir=str(root / "extensions"),
                                    extensions_builtin_dir=None)
    monkeypatch.setitem(sys.modules, "modules", modules)
    return SimpleNamespace(root=root, models=models, controlnet=controlnet)


class Processing:
    """The parts of a WebUI processing object ``SSRRuntime.report`` writes to."""

    is_api = True  # no gradio toast

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []

    def comment(self, text):
        self.comments.append(text)


def everything_shown(p, capsys):
    return "\n".join([capsys.readouterr().err, *p.comments, str(p.extra_generation_params.get(infotext.ERROR)),
                      *getattr(p, rt.ERRORS_ATTR)])


def subject_args(model):
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    return [True, 0.65, 0.0, 1.0, model, None, image, "the dog", 1.0, 5.0]


def test_an_unusable_file_chosen_for_a_generation_is_named_relative_to_the_models_folder(webui, capsys):
    p = Processing()
    assert rt.SSRRuntime().start_generation(p, subject_args("cut.safetensors")) is None
    shown = everything_shown(p, capsys)
    assert "ssr_encoder/cut.safetensors cannot be used: truncated safetensors file" in shown
    assert str(webui.root) not in shown
    assert p.extra_generation_params[infotext.ERROR].startswith("SSR weights: ssr_encoder/cut.safetensors cannot be used")


def test_missing_weights_name_the_searched_folders_by_label(webui, capsys):
    p = Processing()
    assert rt.SSRRuntime().start_generation(p, subject_args(None)) is None  # no CLIP vision weights anywhere
    shown = everything_shown(p, capsys)
    assert "found in ssr_encoder, clip_vision, controlnet" in shown
    assert str(webui.root) not in shown


@pytest.mark.parametrize("where, shown_as", [
    (("models", "ssr_encoder", "release", "pytorch_model_1.bin"), "ssr_encoder/release/pytorch_model_1.bin"),
    (("models", "clip_vision", "vit-l", "model.safetensors"), "clip_vision/vit-l/model.safetensors"),
    (("extensions", "sd-webui-controlnet", "annotator", "downloads", "clip_vision", "clip_h.pth"), "controlnet/clip_h.pth"),
    (("models", "Stable-diffusion", "v1-5.safetensors"), "models/Stable-diffusion/v1-5.safetensors"),
])
def test_reported_errors_hold_no_absolute_server_path(webui, capsys, where, shown_as):
    path = str(webui.root.joinpath(*where))
    p = Processing()
    rt.SSRRuntime().report(p, f"{path}: truncated PyTorch weight file; re-download it",
                           exc=ssr.WeightFileError(f"{path}: truncated"))
    shown = everything_shown(p, capsys)
    assert f"{shown_as}: truncated PyTorch weight file" in shown
    assert str(webui.root) not in shown
