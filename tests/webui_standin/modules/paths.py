"""Mirrors modules/paths.py (+ paths_internal.py): the WebUI's folders.

`models_path` is read at call time by well-behaved extensions (`modules.paths.models_path`); tests point it at a tmp
dir (monkeypatch.setattr(modules.paths, "models_path", str(tmp_path))). The default is a per-process tmp folder so
that nothing ever writes into the repository.
"""
import os
import tempfile

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the "WebUI root" (tests/webui_standin)
data_path = os.path.join(tempfile.gettempdir(), f"webui_standin_data_{os.getpid()}")
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
sd_configs_path = os.path.join(script_path, "configs")
cwd = os.getcwd()
