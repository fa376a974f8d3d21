"""install.py installs only what is missing, with the WebUI's pins, through launch.run_pip."""
import os
import runpy

import launch
from modules import launch_utils

from ssr_webui_testenv import ROOT


def test_nothing_installed_when_everything_is_present():
    launch_utils.run_pip_calls.clear()
    runpy.run_path(os.path.join(ROOT, "install.py"))
    assert launch_utils.run_pip_calls == []


def test_missing_package_installed_with_the_webui_pin(monkeypatch):
    launch_utils.run_pip_calls.clear()
    monkeypatch.setattr(launch, "is_installed", lambda name: name != "open_clip")
    runpy.run_path(os.path.join(ROOT, "install.py"))
    assert [call[0] for call in launch_utils.run_pip_calls] == ["install open-clip-torch==2.20.0"]
