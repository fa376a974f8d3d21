"""SSR-Encoder for the AUTOMATIC1111 WebUI: the AlwaysVisible script (thin; see ``ssr_webui``).

The WebUI imports every ``scripts/*.py`` file as a script module, so the code lives in the
packages ``ssr`` (the method) and ``ssr_webui`` (the glue) beside this folder. They are
imported while the extension folder is on ``sys.path``; later lazy imports of their
submodules resolve through the packages themselves.
"""
import os
import sys

from modules import script_callbacks, scripts

EXTENSION_ROOT = scripts.basedir()  # only valid while this module is being imported
if not os.path.isfile(os.path.join(EXTENSION_ROOT, "ssr_webui", "__init__.py")):
    EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if EXTENSION_ROOT not in sys.path:
    sys.path.insert(0, EXTENSION_ROOT)
    try:
        import ssr  # noqa: F401
        import ssr_webui  # noqa: F401
    finally:
        sys.path.remove(EXTENSION_ROOT)

from ssr_webui import EXTENSION_TITLE, routes, settings, ui  # noqa: E402
from ssr_webui.runtime import SSRRuntime  # noqa: E402

# Owned by this module: a UI reload re-imports it, after on_script_unloaded released the old one.
runtime = SSRRuntime()


class SSREncoderScript(scripts.Script):
    def title(self):
        return EXTENSION_TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        controls, self.infotext_fields, self.paste_field_names = ui.build(self, runtime)
        return controls

    def process(self, p, *args):
        runtime.start_generation(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        runtime.before_sampling(p)

    def postprocess_batch(self, p, *args, **kwargs):
        runtime.after_batch(p)

    def postprocess(self, p, processed, *args):
        runtime.finish_generation(p, processed)


def _on_app_started(demo, app):
    routes.register(app, runtime, ui.loaded_sd_model, ui.generation_lock)


script_callbacks.on_cfg_denoiser(runtime.on_cfg_denoiser)
script_callbacks.on_cfg_after_cfg(runtime.on_cfg_after_cfg)
script_callbacks.on_script_unloaded(runtime.release)
script_callbacks.on_ui_settings(settings.register)
script_callbacks.on_app_started(_on_app_started)
