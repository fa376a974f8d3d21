"""Mirrors modules/launch_utils.py's helpers for install.py: is_installed() for real; run_pip()/run() only RECORD
their calls in `run_pip_calls` / `run_calls` (tests must never install anything)."""
import importlib.metadata
import importlib.util
import sys

python = sys.executable
index_url = ""
run_pip_calls = []
run_calls = []


def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run(command, desc=None, errdesc=None, custom_env=None, live=True):
    run_calls.append((command, desc, errdesc))
    return ""


def run_pip(command, desc=None, live=True):
    """The WebUI runs `"{python}" -m pip {command} --prefer-binary{index_url_line}`; recorded here instead."""
    run_pip_calls.append((command, desc))
    return run(f'"{python}" -m pip {command} --prefer-binary', desc=f"Installing {desc}", errdesc=f"Couldn't install {desc}", live=live)
