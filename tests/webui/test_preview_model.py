"""The UI's "Preview selection" uses the checkpoint a generation would use. Forge loads it at
the first generation (``shared.sd_model`` is a placeholder until then, found by the browser test
on Forge: a preview before any generation said the text encoder was not SD1.x's); its
``sd_models.forge_model_reload()`` loads it, and is a no-op once it is loaded. Hosts without it
(WebUI, reForge) keep ``shared.sd_model``. The host's ``modules`` is a stand-in here."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

from ssr_webui import ui


def _modules(monkeypatch, sd_models):
    modules = types.ModuleType("modules")
    modules.shared = SimpleNamespace(sd_model="placeholder")
    modules.sd_models = sd_models
    monkeypatch.setitem(sys.modules, "modules", modules)
    return modules


def test_forge_loads_the_checkpoint_the_way_a_generation_does(monkeypatch):
    calls = []
    _modules(monkeypatch, SimpleNamespace(forge_model_reload=lambda: calls.append(1) or ("loaded model", True)))
    assert ui.loaded_sd_model() == "loaded model"
    assert calls == [1]


def test_other_hosts_use_shared_sd_model(monkeypatch):
    _modules(monkeypatch, SimpleNamespace())
    assert ui.loaded_sd_model() == "placeholder"
