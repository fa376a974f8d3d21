"""Mirrors the WebUI's launch.py as seen by an extension's install.py: launch.is_installed, launch.run_pip, ..."""
from modules import launch_utils

args = None
python = launch_utils.python
index_url = launch_utils.index_url
is_installed = launch_utils.is_installed
run = launch_utils.run
run_pip = launch_utils.run_pip


def git_tag():
    return "v1.10.1"
