"""Mirrors modules/script_loading.py: how scripts/*.py and preload.py files are imported."""
import importlib.util
import os

from modules import errors

loaded_scripts = {}


def load_module(path):
    """Imports a file as a module named after its file name (e.g. "ssr_encoder.py"), not put in sys.modules."""
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module


def preload_extensions(extensions_dir, parser, extension_list=None):
    """Runs preload(parser) of every extension folder's preload.py (adds command-line flags before parsing)."""
    if not os.path.isdir(extensions_dir):
        return
    extensions = extension_list if extension_list is not None else os.listdir(extensions_dir)
    for dirname in sorted(extensions):
        preload_script = os.path.join(extensions_dir, dirname, "preload.py")
        if not os.path.isfile(preload_script):
            continue
        try:
            module = load_module(preload_script)
            if hasattr(module, 'preload'):
                module.preload(parser)
        except Exception:
            errors.report(f"Error running preload() for {preload_script}", exc_info=True)
