"""Render the SSR-Encoder accordion, built by the real ``ui()`` under gradio 3.41.2, to a PNG with
headless Chromium (for the README).

    .venv/bin/python docs/tools/render_webui_screenshot.py docs/images/webui_accordion.png

Runs against the test stand-in of the WebUI (tests/webui_standin) with tiny random weights saved
under realistic file names in a temporary models folder; needs a ``chromium`` binary on PATH.
The WebUI's own stylesheet is not there, so gradio's default theme is shown.
"""
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "webui_standin")]

import gradio as gr  # noqa: E402
import torch  # noqa: E402

import harness  # noqa: E402
import tiny_sd  # noqa: E402
from modules import paths  # noqa: E402

import ssr  # noqa: E402
from tests import tiny_models as tm  # noqa: E402


def _serve_with_this_venv() -> None:
    """The test venv has current starlette/fastapi, not the WebUI's pins: adapt the two calls
    of gradio 3.41's server that changed (template responses, the localhost probe)."""
    import gradio.networking
    from starlette.templating import Jinja2Templates

    original = Jinja2Templates.TemplateResponse

    def template_response(self, *args, **kwargs):
        if args and isinstance(args[0], str):  # the old (name, context) call
            name, context, *rest = args
            return original(self, context["request"], name, context, *rest, **kwargs)
        return original(self, *args, **kwargs)

    Jinja2Templates.TemplateResponse = template_response
    gradio.networking.url_ok = lambda url: True


def main(output: str, port: int = 7899) -> None:
    models = os.path.join(tempfile.mkdtemp(), "models")
    os.makedirs(os.path.join(models, "ssr_encoder"))
    ssr.save_ssr_weights(tm.tiny_ssr_weights(context_dim=32), os.path.join(models, "ssr_encoder", "ssr_sd15.safetensors"))
    tm.tiny_hf_clip_vision().save_pretrained(os.path.join(models, "clip_vision", "clip-vit-large-patch14"))
    paths.models_path = models

    harness.reset_webui_state()
    harness.start_webui([ROOT], sd_model=tiny_sd.make_tiny_sd_model())
    script = harness.scripts.scripts_txt2img.script("SSR-Encoder")
    tool_button_css = ".tool { max-width: 2.6em; min-width: 2.6em !important; height: 2.6em; align-self: end; }"  # as the WebUI's style.css
    with gr.Blocks(title="SSR-Encoder", css=tool_button_css) as demo:
        with gr.Column(elem_id="txt2img_script_container"):
            controls = script.ui(False)
    controls[0].accordion.open = True  # shown opened (= enabled)
    _serve_with_this_venv()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        time.sleep(2)
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={os.path.abspath(output)}", "--window-size=900,1250",
                        "--virtual-time-budget=15000", f"http://127.0.0.1:{port}/"], check=True, timeout=120)
    finally:
        demo.close()
    print(f"wrote {output}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "images", "webui_accordion.png"))
