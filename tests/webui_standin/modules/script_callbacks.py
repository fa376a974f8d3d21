"""Mirrors modules/script_callbacks.py (v1.10.1): registration (on_*), firing (*_callback, each callback wrapped in
try/except + errors.report), the params classes, clear_callbacks(), remove_callbacks_for_function().

Ordering by metadata.ini / user settings (sort_callbacks) is not reproduced: callbacks run in registration order.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Optional

from modules import errors


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class ExtraNoiseParams:
    def __init__(self, noise, x, xi):
        self.noise = noise
        self.x = x
        self.xi = xi


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        """Latent image representation in the process of being denoised"""
        self.image_cond = image_cond
        """Conditioning image"""
        self.sigma = sigma
        """Current sigma noise step value"""
        self.sampling_step = sampling_step
        """Current Sampling step number"""
        self.total_sampling_steps = total_sampling_steps
        """Total number of sampling steps planned"""
        self.text_cond = text_cond
        """ Encoder hidden states of text conditioning from prompt"""
        self.text_uncond = text_uncond
        """ Encoder hidden states of text conditioning from negative prompt"""
        self.denoiser = denoiser
        """Current CFGDenoiser object with processing parameters"""


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


class UiTrainTabParams:
    def __init__(self, txt2img_preview_params):
        self.txt2img_preview_params = txt2img_preview_params


class ImageGridLoopParams:
    def __init__(self, imgs, cols, rows):
        self.imgs = imgs
        self.cols = cols
        self.rows = rows


@dataclasses.dataclass
class BeforeTokenCounterParams:
    prompt: str
    steps: int
    styles: list
    is_positive: bool = True


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


def _extension_name(filename):
    """The canonical name the WebUI gives the extension owning `filename` (its folder, lowercased), else 'base'."""
    parts = os.path.normpath(filename).split(os.sep)
    if "scripts" in parts[:-1]:
        index = len(parts) - 1 - parts[::-1].index("scripts")
        if index > 0:
            return parts[index - 1].lower()
    return "base"


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else 'unknown file'

    callback_name = f"{_extension_name(filename)}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f'/{name}'

    unique_callback_name = callback_name
    for index in range(1000):
        if not any(x.name == unique_callback_name for x in callbacks):
            break
        unique_callback_name = f'{callback_name}-{index+1}'

    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def sort_callbacks(category, unordered_callbacks, *, enable_user_sort=True):
    return unordered_callbacks.copy()


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get('callbacks_' + category, [])
    return list(unordered_callbacks)


callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_before_image_saved=[],
    callbacks_image_saved=[],
    callbacks_extra_noise=[],
    callbacks_cfg_denoiser=[],
    callbacks_cfg_denoised=[],
    callbacks_cfg_after_cfg=[],
    callbacks_before_component=[],
    callbacks_after_component=[],
    callbacks_image_grid=[],
    callbacks_infotext_pasted=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
    callbacks_on_reload=[],
    callbacks_list_optimizers=[],
    callbacks_list_unets=[],
    callbacks_before_token_counter=[],
)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def _fire(category, job, *args, reverse=False, **kwargs):
    callbacks = ordered_callbacks(category)
    for c in (reversed(callbacks) if reverse else callbacks):
        try:
            c.callback(*args, **kwargs)
        except Exception:
            report_exception(c, job)


def app_started_callback(demo: Optional[Any], app):
    _fire('app_started', 'app_started_callback', demo, app)


def app_reload_callback():
    _fire('on_reload', 'callbacks_on_reload')


def model_loaded_callback(sd_model):
    _fire('model_loaded', 'model_loaded_callback', sd_model)


def ui_tabs_callback():
    res = []
    for c in ordered_callbacks('ui_tabs'):
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def ui_train_tabs_callback(params: UiTrainTabParams):
    _fire('ui_train_tabs', 'callbacks_ui_train_tabs', params)


def ui_settings_callback():
    _fire('ui_settings', 'ui_settings_callback')


def before_image_saved_callback(params: ImageSaveParams):
    _fire('before_image_saved', 'before_image_saved_callback', params)


def image_saved_callback(params: ImageSaveParams):
    _fire('image_saved', 'image_saved_callback', params)


def extra_noise_callback(params: ExtraNoiseParams):
    _fire('extra_noise', 'callbacks_extra_noise', params)


def cfg_denoiser_callback(params: CFGDenoiserParams):
    _fire('cfg_denoiser', 'cfg_denoiser_callback', params)


def cfg_denoised_callback(params: CFGDenoisedParams):
    _fire('cfg_denoised', 'cfg_denoised_callback', params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams):
    _fire('cfg_after_cfg', 'cfg_after_cfg_callback', params)


def before_component_callback(component, **kwargs):
    _fire('before_component', 'before_component_callback', component, **kwargs)


def after_component_callback(component, **kwargs):
    _fire('after_component', 'after_component_callback', component, **kwargs)


def image_grid_callback(params: ImageGridLoopParams):
    _fire('image_grid', 'image_grid', params)


def infotext_pasted_callback(infotext: str, params: dict[str, Any]):
    _fire('infotext_pasted', 'infotext_pasted', infotext, params)


def script_unloaded_callback():
    _fire('script_unloaded', 'script_unloaded', reverse=True)


def before_ui_callback():
    _fire('before_ui', 'before_ui', reverse=True)


def list_optimizers_callback():
    res = []
    _fire('list_optimizers', 'list_optimizers', res)
    return res


def list_unets_callback():
    res = []
    _fire('list_unets', 'list_unets', res)
    return res


def before_token_counter_callback(params: BeforeTokenCounterParams):
    _fire('before_token_counter', 'before_token_counter', params)


def remove_current_script_callbacks():
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else 'unknown file'
    if filename == 'unknown file':
        return
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)


def _register(category):
    def register(callback, *, name=None):
        add_callback(callback_map['callbacks_' + category], callback, name=name, category=category)
    register.__name__ = f"on_{category}"
    return register


on_app_started = _register('app_started')
"""callback(demo: gr.Blocks | None, app: FastAPI); demo is None with --nowebui"""
on_before_reload = _register('on_reload')
on_model_loaded = _register('model_loaded')
"""callback(sd_model)"""
on_ui_tabs = _register('ui_tabs')
on_ui_train_tabs = _register('ui_train_tabs')
on_ui_settings = _register('ui_settings')
"""callback(); add settings with shared.opts.add_option(key, shared.OptionInfo(...))"""
on_before_image_saved = _register('before_image_saved')
on_image_saved = _register('image_saved')
on_extra_noise = _register('extra_noise')
on_cfg_denoiser = _register('cfg_denoiser')
"""callback(params: CFGDenoiserParams), fired in CFGDenoiser.forward before the UNet runs"""
on_cfg_denoised = _register('cfg_denoised')
"""callback(params: CFGDenoisedParams), fired after the UNet ran, before CFG is combined"""
on_cfg_after_cfg = _register('cfg_after_cfg')
on_before_component = _register('before_component')
on_after_component = _register('after_component')
on_image_grid = _register('image_grid')
on_infotext_pasted = _register('infotext_pasted')
on_script_unloaded = _register('script_unloaded')
"""callback(); called (in reverse registration order) before scripts are re-imported on UI reload"""
on_before_ui = _register('before_ui')
on_list_optimizers = _register('list_optimizers')
on_list_unets = _register('list_unets')
on_before_token_counter = _register('before_token_counter')
