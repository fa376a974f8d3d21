"""Helpers shared by the WebUI extension tests (fixtures are in conftest.py): the stand-in WebUI
(tests/webui_standin) with this extension loaded, images, argument lists.

The stand-in's ``tiny_sd`` is loaded under a private module name, because tests/trainer has a
``tiny_sd`` module of its own and both directories may run in one pytest process.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import os
import sys
from types import SimpleNamespace

import numpy as np
from PIL import Image


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STANDIN = os.path.join(ROOT, "tests", "webui_standin")
for path in (ROOT, STANDIN):
    if path not in sys.path:
        sys.path.insert(0, path)

import controlnet_standin  # noqa: E402
import harness  # noqa: E402
from modules import script_callbacks, scripts, shared  # noqa: E402,F401  (re-exported to the tests)


def _load_standin_module(name):
    module_name = f"webui_standin_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(STANDIN, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


tiny_sd = _load_standin_module("sd_model_standin")


TITLE = "SSR-Encoder"
SINGLE = "tiny_ssr.safetensors"
PAIR = "official/pytorch_model.bin"
CLIP = "clip_vision/tiny-clip-vit"


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def reference_image(seed=0, w=80, h=64) -> Image.Image:
    """A smooth random picture (not noise, so the tiny CLIP sees structure)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def box_mask(w=80, h=64, box=(20, 10, 60, 50)) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(a)


def _script_module():
    for data in scripts.scripts_data:
        if os.path.abspath(data.path) == os.path.join(ROOT, "scripts", "ssr_encoder.py"):
            return data.module
    raise AssertionError(f"the SSR-Encoder script was not loaded; errors: {getattr(harness.errors, 'reported', None)}")


def start(sd_model, *, controlnet=None, app=None):
    """Start the stand-in with this extension; controlnet: None, "after" or "before" (load order)."""
    harness.reset_webui_state()
    extra = (controlnet_standin.ControlNetStandinScript,) if controlnet == "after" else ()
    if controlnet == "before":
        scripts.load_scripts([])
        scripts.register_script_class(controlnet_standin.ControlNetStandinScript)
        scripts.load_scripts([ROOT], clear=False)
        runners = _finish_start(sd_model, app)
    else:
        runners = harness.start_webui([ROOT], extra, sd_model=sd_model, app=app)
    module = _script_module()
    return SimpleNamespace(txt2img=runners[0], img2img=runners[1], model=sd_model, module=module,
                           runtime=module.runtime, unet=sd_model.model.diffusion_model)


def _finish_start(sd_model, app):
    """harness.start_webui after load_scripts (for a custom load order)."""
    harness.load_model(sd_model)
    demo = None
    for is_img2img in (False, True):
        runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
        runner.initialize_scripts(is_img2img)
        demo = harness.build_ui(runner)
    script_callbacks.ui_settings_callback()
    from modules.api import api
    for runner in (scripts.scripts_txt2img, scripts.scripts_img2img):
        harness._api_defaults[id(runner)] = api.init_default_script_args(runner)
    if app is None:
        from fastapi import FastAPI
        app = FastAPI()
    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(demo, app)
    return scripts.scripts_txt2img, scripts.scripts_img2img


def hooks_left(unet) -> int:
    """Every forward hook / pre-hook still registered on the UNet or one of its modules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def ssr_args(*subjects, enabled=True, scale=0.65, start=0.0, end=1.0, model=SINGLE, clip_model=CLIP, slots=3):
    """Positional args as the UI sends them; subjects: (image or sketch dict, query, weight, mask_weight)."""
    args = [enabled, scale, start, end, model, clip_model]
    for i in range(slots):
        args += list(subjects[i]) if i < len(subjects) else [None, "", 1.0, 5.0]
    return args
