"""Mirrors the script-facing part of modules/api/api.py (v1.10.1).

decode_base64_to_image: data URLs have their "data:image/...;base64," prefix dropped; anything undecodable raises
fastapi HTTPException(500, "Invalid encoded image"); http(s) URLs are refused here (no network in tests; the real one
fetches them when opts.api_enable_requests). script_name_to_index / init_default_script_args / init_script_args are
the functions (methods of Api in the WebUI) that turn `"alwayson_scripts": {"<title>": {"args": [...]}}` into
p.script_args: titles matched case-insensitively, an unknown title is a 422, args copied position by position with
no validation or conversion, positions not sent keep the ui() defaults.
"""
import base64
from io import BytesIO

import gradio as gr
from fastapi.exceptions import HTTPException

from modules import images
from modules.shared import opts


def script_name_to_index(name, scripts):
    try:
        return [script.title().lower() for script in scripts].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def decode_base64_to_image(encoding):
    if encoding.startswith("http://") or encoding.startswith("https://"):
        if not opts.api_enable_requests:
            raise HTTPException(status_code=500, detail="Requests not allowed")
        raise HTTPException(status_code=500, detail="Request to local resource not allowed")

    if encoding.startswith("data:image/"):
        encoding = encoding.split(";")[1].split(",")[1]
    try:
        image = images.read(BytesIO(base64.b64decode(encoding)))
        return image
    except Exception as e:
        raise HTTPException(status_code=500, detail="Invalid encoded image") from e


def encode_pil_to_base64(image):
    with BytesIO() as output_bytes:
        image.save(output_bytes, format="PNG")
        return base64.b64encode(output_bytes.getvalue())


def get_script(script_name, script_runner):
    if script_name is None or script_name == "":
        return None
    script_idx = script_name_to_index(script_name, script_runner.scripts)
    return script_runner.scripts[script_idx]


def init_default_script_args(script_runner):
    """Api.init_default_script_args: calls every script's ui() AGAIN inside a fresh gr.Blocks() to read defaults."""
    last_arg_index = 1
    for script in script_runner.scripts:
        if last_arg_index < script.args_to:
            last_arg_index = script.args_to
    script_args = [None] * last_arg_index
    script_args[0] = 0

    with gr.Blocks():
        for script in script_runner.scripts:
            if script.ui(script.is_img2img):
                ui_default_values = []
                for elem in script.ui(script.is_img2img):
                    ui_default_values.append(elem.value)
                script_args[script.args_from:script.args_to] = ui_default_values
    return script_args


def init_script_args(alwayson_scripts, default_script_args, script_runner, *, input_script_args=None):
    """Api.init_script_args for a request without a selectable script: `alwayson_scripts` is the request's dict."""
    script_args = default_script_args.copy()
    if input_script_args is not None:
        for index, value in input_script_args.items():
            script_args[index] = value

    if alwayson_scripts:
        for alwayson_script_name in alwayson_scripts.keys():
            alwayson_script = get_script(alwayson_script_name, script_runner)
            if alwayson_script is None:
                raise HTTPException(status_code=422, detail=f"always on script {alwayson_script_name} not found")
            if alwayson_script.alwayson is False:
                raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
            if "args" in alwayson_scripts[alwayson_script_name]:
                request_args = alwayson_scripts[alwayson_script_name]["args"]
                for idx in range(0, min((alwayson_script.args_to - alwayson_script.args_from), len(request_args))):
                    script_args[alwayson_script.args_from + idx] = request_args[idx]
    return script_args
