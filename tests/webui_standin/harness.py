"""Drives the stand-in the way the WebUI does, and resets it between tests. Not a WebUI module (test support).

    import sys; sys.path.insert(0, "<repo>/tests/webui_standin")
    import harness, sd_model_standin as tiny_sd
    harness.reset_webui_state()
    txt2img_runner, img2img_runner = harness.start_webui([extension_dir], sd_model=tiny_sd.make_tiny_sd_model())
    processed = harness.txt2img(txt2img_runner, script_args_by_title={"SSR-Encoder": [True, ...]}, prompt="a cat", steps=3, width=64, height=64)
    processed = harness.api_txt2img({"prompt": "a cat", "steps": 3, "width": 64, "height": 64,
                                     "alwayson_scripts": {"ssr-encoder": {"args": [...]}}})

Startup order reproduced (webui.py): preload.py flags -> load_scripts() (imports scripts/*.py with basedir() set,
callbacks registered) -> model load (sd_hijack applies the cross-attention optimisation, on_model_loaded fires) ->
UI: each runner initialize_scripts(is_img2img) + setup_ui() inside gr.Blocks, on_ui_settings fires -> API created
(Api.__init__ calls every ui() again for the API defaults) -> on_app_started(demo or None with --nowebui, app).
"""
import argparse
from contextlib import closing

import gradio as gr

import controlnet_standin
from modules import errors, launch_utils, processing, script_callbacks, script_loading, scripts, sd_hijack, shared
from modules.api import api

_api_defaults = {}


def reset_webui_state():
    """Back to a freshly started, empty WebUI: no callbacks, no scripts, default options and flags, pristine ldm
    CrossAttention.forward, no ControlNet patches, no model."""
    script_callbacks.clear_callbacks()
    scripts.scripts_data.clear()
    scripts.scripts_txt2img = scripts.scripts_img2img = scripts.scripts_current = None
    scripts.current_basedir = scripts.paths.script_path
    shared.reset_opts()
    shared.state.begin()
    shared.state.end()
    for key, value in vars(shared.parser.parse_args([])).items():
        setattr(shared.cmd_opts, key, value)
    for key in set(vars(shared.cmd_opts)) - set(vars(shared.parser.parse_args([]))):
        delattr(shared.cmd_opts, key)
    controlnet_standin.clear_all_ip_adapter()
    sd_hijack.restore_ldm_forward()
    shared.sd_model = None
    errors.reported.clear()
    launch_utils.run_pip_calls.clear()
    launch_utils.run_calls.clear()
    _api_defaults.clear()


def apply_preload(extensions_dir, argv=()):
    """Runs every extension's preload(parser) on a copy of the WebUI parser, then parses `argv` into shared.cmd_opts
    (updated in place, as extensions keep a reference to it). Returns shared.cmd_opts."""
    parser = argparse.ArgumentParser(parents=[shared.parser], add_help=False, conflict_handler="resolve")
    script_loading.preload_extensions(extensions_dir, parser)
    for key, value in vars(parser.parse_args(list(argv))).items():
        setattr(shared.cmd_opts, key, value)
    return shared.cmd_opts


def load_model(sd_model):
    """shared.sd_model = sd_model, cross-attention optimisation (re)applied at class level, on_model_loaded fired."""
    shared.sd_model = sd_model
    sd_hijack.model_hijack.hijack(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def build_ui(runner):
    with gr.Blocks() as demo:
        runner.prepare_ui()
        runner.setup_ui()
    return demo


def start_webui(extension_dirs=(), extra_script_classes=(), *, sd_model=None, nowebui=False, app=None):
    """Loads extensions' scripts (+ Script classes given directly, e.g. controlnet_standin.ControlNetStandinScript),
    loads the model, builds both UIs, fires on_ui_settings and on_app_started. Returns (txt2img, img2img) runners."""
    scripts.load_scripts(extension_dirs)
    for script_class in extra_script_classes:
        scripts.register_script_class(script_class)

    if sd_model is not None:
        load_model(sd_model)

    demo = None
    for is_img2img in (False, True):
        runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
        runner.initialize_scripts(is_img2img)
        demo = build_ui(runner)
    script_callbacks.ui_settings_callback()

    for runner in (scripts.scripts_txt2img, scripts.scripts_img2img):
        _api_defaults[id(runner)] = api.init_default_script_args(runner)

    if app is None:
        from fastapi import FastAPI
        app = FastAPI()
    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(None if nowebui else demo, app)
    return scripts.scripts_txt2img, scripts.scripts_img2img


def reload_ui(extension_dirs=(), extra_script_classes=(), *, nowebui=False):
    """"Reload UI" (webui.py restart loop): on_before_reload callbacks, on_script_unloaded callbacks (reverse order),
    then the scripts are imported again (callbacks cleared and re-registered) and the UI rebuilt. The model stays
    loaded; on_model_loaded is fired again, as its docstring in script_callbacks promises ("also called when the
    script is reloaded")."""
    script_callbacks.app_reload_callback()
    script_callbacks.script_unloaded_callback()
    runners = start_webui(extension_dirs, extra_script_classes, nowebui=nowebui)
    if shared.sd_model is not None:
        script_callbacks.model_loaded_callback(shared.sd_model)
    return runners


def ui_script_args(runner, script_args_by_title=None):
    """The *args the UI sends: [0 (no selectable script), every component's current value...], with the values of
    the scripts named in script_args_by_title ({title: [v0, v1, ...]}, a prefix is enough) replaced."""
    args = [0] + [getattr(component, "value", None) for component in runner.inputs[1:]]
    for title, values in (script_args_by_title or {}).items():
        script = runner.script(title)
        if script is None:
            raise KeyError(f"no script titled {title!r} in this runner (titles: {list(runner.title_map)})")
        if len(values) > script.args_to - script.args_from:
            raise ValueError(f"{title}: {len(values)} values given, the script has {script.args_to - script.args_from} args")
        args[script.args_from:script.args_from + len(values)] = values
    return tuple(args)


def _run(p, runner, script_args):
    shared.state.begin(job="standin")
    try:
        with closing(p):
            p.scripts = runner
            p.script_args = script_args
            processed = runner.run(p, *p.script_args)
            if processed is None:
                processed = processing.process_images(p)
    finally:
        shared.state.end()
    return processed


def txt2img(runner=None, *, script_args_by_title=None, **p_kwargs):
    """modules/txt2img.py txt2img(): UI path (p.is_api False; scripts' setup runs with is_ui=True)."""
    runner = runner or scripts.scripts_txt2img
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, **p_kwargs)
    return _run(p, runner, ui_script_args(runner, script_args_by_title))


def img2img(runner=None, *, script_args_by_title=None, **p_kwargs):
    """modules/img2img.py img2img(): UI path; pass init_images=[PIL.Image] (and mask=PIL.Image for inpainting)."""
    runner = runner or scripts.scripts_img2img
    p = processing.StableDiffusionProcessingImg2Img(sd_model=shared.sd_model, **p_kwargs)
    return _run(p, runner, ui_script_args(runner, script_args_by_title))


def _api_run(request, runner, processing_class):
    request = dict(request)
    alwayson_scripts = request.pop("alwayson_scripts", None)
    request.pop("script_name", None)
    request.pop("script_args", None)
    request.pop("send_images", None)
    save_images = request.pop("save_images", False)
    request.setdefault("do_not_save_samples", not save_images)
    request.setdefault("do_not_save_grid", not save_images)
    script_args = api.init_script_args(alwayson_scripts, _api_defaults[id(runner)], runner)
    p = processing_class(sd_model=shared.sd_model, **request)
    p.is_api = True
    return _run(p, runner, tuple(script_args))


def api_txt2img(request: dict, runner=None):
    """POST /sdapi/v1/txt2img as the WebUI handles it (without the HTTP layer): alwayson_scripts args copied into the
    ui() defaults with no validation, p.is_api = True, p.script_args a tuple. Unknown titles raise HTTPException 422."""
    return _api_run(request, runner or scripts.scripts_txt2img, processing.StableDiffusionProcessingTxt2Img)


def api_img2img(request: dict, runner=None):
    """POST /sdapi/v1/img2img: request["init_images"] (base64 strings) and "mask" are decoded first."""
    request = dict(request)
    request["init_images"] = [api.decode_base64_to_image(x) for x in request.get("init_images") or []]
    if request.get("mask"):
        request["mask"] = api.decode_base64_to_image(request["mask"])
    return _api_run(request, runner or scripts.scripts_img2img, processing.StableDiffusionProcessingImg2Img)
