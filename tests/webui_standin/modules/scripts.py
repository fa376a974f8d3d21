"""Mirrors modules/scripts.py (v1.10.1): the Script base class, AlwaysVisible, basedir(), script loading and the
ScriptRunner that calls AlwaysVisible hooks.

Faithful points: hook names and signatures; script args are p.script_args[args_from:args_to]; every hook call is
wrapped in try/except that only errors.report()s ("Error running <hook>: <file>") so generation goes on; a hook is
skipped when the script class does not override it; setup is skipped for setup_for_ui_only scripts on the API path;
scripts are instantiated per runner (txt2img and img2img) with is_img2img set before show().
Not reproduced: metadata.ini ordering, UI sections other than the default, on_before/after_component elem_id hooks.
"""
import inspect
import os
import re
import sys
from collections import namedtuple
from dataclasses import dataclass

import gradio as gr

from modules import errors, paths, script_callbacks, script_loading, shared

AlwaysVisible = object()


class MaskBlendArgs:
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class PostProcessMaskOverlayArgs:
    def __init__(self, index, mask_for_overlay, overlay_image):
        self.index = index
        self.mask_for_overlay = mask_for_overlay
        self.overlay_image = overlay_image


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


@dataclass
class OnComponent:
    component: object


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    def on_mask_blend(self, p, mba: MaskBlendArgs, *args):
        pass

    def post_sample(self, p, ps: PostSampleArgs, *args):
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs, *args):
        pass

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass

    def on_before_component(self, callback, *, elem_id):
        if self.on_before_component_elem_id is None:
            self.on_before_component_elem_id = []
        self.on_before_component_elem_id.append((elem_id, callback))

    def on_after_component(self, callback, *, elem_id):
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))

    def describe(self):
        return ""

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = 'img2img' if self.is_img2img else 'txt2img'
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'

    def before_hr(self, p, *args):
        pass


current_basedir = paths.script_path


def basedir():
    """returns the base directory for the current script: the extension folder while its scripts/*.py is being
    imported, the WebUI root otherwise (so it must be called at module level)."""
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []


def list_extension_scripts(extension_dir):
    scripts_dir = os.path.join(extension_dir, "scripts")
    if not os.path.isdir(scripts_dir):
        return []
    return [ScriptFile(extension_dir, f, os.path.join(scripts_dir, f)) for f in sorted(os.listdir(scripts_dir))
            if os.path.isfile(os.path.join(scripts_dir, f)) and os.path.splitext(f)[1].lower() == ".py"]


def load_scripts(extension_dirs=(), *, clear=True):
    """Like the WebUI's load_scripts(): clears callbacks, imports every extension's scripts/*.py with basedir() set to
    the extension folder and that folder prepended to sys.path, registers Script subclasses in scripts_data and
    creates fresh scripts_txt2img / scripts_img2img runners. Import errors are reported, not raised."""
    global current_basedir, scripts_txt2img, scripts_img2img
    if clear:
        scripts_data.clear()
        script_callbacks.clear_callbacks()

    syspath = sys.path
    for extension_dir in extension_dirs:
        for scriptfile in list_extension_scripts(extension_dir):
            try:
                sys.path = [scriptfile.basedir] + sys.path
                current_basedir = scriptfile.basedir
                module = script_loading.load_module(scriptfile.path)
                for script_class in module.__dict__.values():
                    if inspect.isclass(script_class) and issubclass(script_class, Script):
                        scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
            except Exception:
                errors.report(f"Error loading script: {scriptfile.filename}", exc_info=True)
            finally:
                sys.path = syspath
                current_basedir = paths.script_path

    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()


def register_script_class(script_class, path=None):
    """Stand-in helper: register a Script subclass defined in a test (or the ControlNet stand-in) like a loaded one."""
    path = path or inspect.getfile(script_class)
    scripts_data.append(ScriptClassData(script_class, path, os.path.dirname(path), inspect.getmodule(script_class)))


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()

        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {script_data.module}: ", exc_info=True)
                continue

            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"

            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        try:
            self.create_script_ui_inner(script)
        except Exception:
            errors.report(f"Error creating UI for {script.name}: ", exc_info=True)

    def create_script_ui_inner(self, script):
        import modules.api.models as api_models

        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        script.controls = controls
        if controls is None:
            return

        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()

        api_args = []
        for control in controls:
            control.custom_script_source = os.path.basename(script.filename)
            arg_info = api_models.ScriptArg(label=getattr(control, "label", None) or "")
            for field in ("value", "minimum", "maximum", "step"):
                v = getattr(control, field, None)
                if v is not None:
                    setattr(arg_info, field, v)
            choices = getattr(control, 'choices', None)
            if choices is not None:
                arg_info.choices = [x[0] if isinstance(x, tuple) else x for x in choices]
            api_args.append(arg_info)

        script.api_info = api_models.ScriptInfo(name=script.name, is_img2img=script.is_img2img, is_alwayson=script.alwayson, args=api_args)

        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names

        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui_for_section(self, section, scriptlist=None):
        if scriptlist is None:
            scriptlist = self.alwayson_scripts
        for script in scriptlist:
            if script.alwayson and script.section != section:
                continue
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def prepare_ui(self):
        self.inputs = [None]

    def setup_ui(self):
        """Must run inside `with gr.Blocks():` (harness.build_ui does that)."""
        all_titles = [wrap_call(script.title, script.filename, "title") or script.filename for script in self.scripts]
        self.title_map = {title.lower(): script for title, script in zip(all_titles, self.scripts)}
        self.titles = [wrap_call(script.title, script.filename, "title") or f"{script.filename} [error]" for script in self.selectable_scripts]

        self.setup_ui_for_section(None)
        dropdown = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"] + self.titles, value="None", type="index")
        self.inputs[0] = dropdown
        self.setup_ui_for_section(None, self.selectable_scripts)
        return self.inputs

    def run(self, p, *args):
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        if script is None:
            return None
        script_args = args[script.args_from:script.args_to]
        processed = script.run(p, *script_args)
        shared.total_tqdm.clear()
        return processed

    def list_scripts_for_method(self, method_name):
        if method_name in ('before_component', 'after_component'):
            return self.scripts
        return self.alwayson_scripts

    def ordered_scripts(self, method_name):
        """Scripts whose class overrides `method_name`, in load order."""
        return [s for s in self.list_scripts_for_method(method_name)
                if getattr(s.__class__, method_name, None) != getattr(Script, method_name, None)]

    def _call_hook(self, method_name, p, *leading_args, **kwargs):
        """script.<method_name>(p, *leading_args, *script_args, **kwargs) for each script; errors are reported only."""
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method_name)(p, *leading_args, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def setup_scrips(self, p, *, is_ui=True):
        for script in self.ordered_scripts('setup'):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                script.setup(p, *script_args)
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._call_hook('before_process', p)

    def process(self, p):
        self._call_hook('process', p)

    def process_before_every_sampling(self, p, **kwargs):
        self._call_hook('process_before_every_sampling', p, **kwargs)

    def before_process_batch(self, p, **kwargs):
        self._call_hook('before_process_batch', p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._call_hook('after_extra_networks_activate', p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._call_hook('process_batch', p, **kwargs)

    def postprocess(self, p, processed):
        self._call_hook('postprocess', p, processed)

    def postprocess_batch(self, p, images, **kwargs):
        self._call_hook('postprocess_batch', p, images=images, **kwargs)

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        self._call_hook('postprocess_batch_list', p, pp, **kwargs)

    def post_sample(self, p, ps: PostSampleArgs):
        self._call_hook('post_sample', p, ps)

    def on_mask_blend(self, p, mba: MaskBlendArgs):
        self._call_hook('on_mask_blend', p, mba)

    def postprocess_image(self, p, pp: PostprocessImageArgs):
        self._call_hook('postprocess_image', p, pp)

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs):
        self._call_hook('postprocess_maskoverlay', p, ppmo)

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs):
        self._call_hook('postprocess_image_after_composite', p, pp)

    def before_hr(self, p):
        self._call_hook('before_hr', p)

    def before_component(self, component, **kwargs):
        for script in self.ordered_scripts('before_component'):
            try:
                script.before_component(component, **kwargs)
            except Exception:
                errors.report(f"Error running before_component: {script.filename}", exc_info=True)

    def after_component(self, component, **kwargs):
        for script in self.ordered_scripts('after_component'):
            try:
                script.after_component(component, **kwargs)
            except Exception:
                errors.report(f"Error running after_component: {script.filename}", exc_info=True)

    def script(self, title):
        return self.title_map.get(title.lower())


scripts_txt2img: ScriptRunner = None
scripts_img2img: ScriptRunner = None
scripts_current: ScriptRunner = None
