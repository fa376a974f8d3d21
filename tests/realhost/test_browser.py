"""The browser test (issue 8, item 5): the real WebUI v1.10.1 with its UI, as a user starts it
(``launch.py`` bound to 127.0.0.1, this extension ``git clone``d and sd-webui-controlnet
beside it), used in headless Chromium by ``browser_session.py``: the accordion renders,
an upload, Preview shows the heatmap, Generate, PNG Info -> Send to txt2img restores the
fields (the steps and checks are listed in browser_session.py).

The session runs in the browser venv of build_host.py (selenium kept out of the WebUI's
venv) with Debian's ``chromium`` + ``chromedriver``. The screenshots of every step, the
generated PNG and the WebUI's log go to ``$SSR_SCREENSHOT_DIR`` or else a new
``/tmp/ssr-browser-screenshots/<time>``; the folder is printed as ``screenshots: <path>``
and kept.

gradio 3.41 refuses to serve any file below a folder whose name starts with a dot (the
WebUI's own ``script.js`` and ``javascript/*.js`` included, which leaves a UI without its
scripts), and the host cache is ``.realhost`` or ``~/.cache/...``: the server runs from a
copy of the cached WebUI tree under the test's own folder (34 MB, a second).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

import build_host
import payloads as pl
from servers import free_port, listening_pid, log_tail, server_pids

INFO = json.load(open(os.path.join(build_host.CACHE, "host.json")))
HERE = os.path.dirname(os.path.abspath(__file__))
START_TIMEOUT = float(os.environ.get("SSR_BROWSER_START_TIMEOUT", "300"))
STEP_TIMEOUT = float(os.environ.get("SSR_BROWSER_STEP_TIMEOUT", "120"))
SESSION_TIMEOUT = 900


def screenshot_dir(suffix: str = "") -> str:
    """``$SSR_SCREENSHOT_DIR``, or a new ``/tmp/ssr-browser-screenshots/<time><suffix>``."""
    path = os.environ.get("SSR_SCREENSHOT_DIR") or os.path.join(
        tempfile.gettempdir(), "ssr-browser-screenshots", time.strftime("%Y%m%d-%H%M%S") + suffix)
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)


def browser_tools(info: dict, build_command: str) -> str:
    """-> the browser venv's python; fails with what to install when it or chromium is missing."""
    browser_python = info.get("browser_python")
    assert browser_python and os.path.exists(browser_python), (
        f"the browser venv is not built: run `{build_command}` (host.json has no browser_python)")
    missing = [b for b in ("chromium", "chromedriver") if not shutil.which(b)]
    assert not missing, (f"{' and '.join(missing)} not on PATH: apt-get install chromium chromium-driver "
                         "fonts-noto-color-emoji (.ci/run does it when run as root)")
    return browser_python


def run_browser_session(browser_python: str, script: str, server, reference: str, shots: str, say, host: str) -> None:
    """Run the session ``script`` (in the browser venv) against the serving ``server``, keep its
    output in ``shots``/browser_session.log, and fail with it and the end of ``host``'s log
    unless every step passed. Stops the server in any case."""
    try:
        try:
            run = subprocess.run([browser_python, script, "--url", server.url, "--reference", reference, "--out", shots,
                                  "--timeout", str(STEP_TIMEOUT)],
                                 capture_output=True, text=True, timeout=SESSION_TIMEOUT, stdin=subprocess.DEVNULL)
            output, rc = run.stdout + run.stderr, run.returncode
        except subprocess.TimeoutExpired as e:
            output, rc = f"{e.stdout or ''}{e.stderr or ''}\nthe browser session ran past {SESSION_TIMEOUT} s", -1
        with open(os.path.join(shots, "browser_session.log"), "w") as f:
            f.write(output)
        say(output.strip())
        assert rc == 0, (f"the browser session failed (screenshots and logs in {shots}):\n{output[-4000:]}\n"
                         f"--- {host}'s log ends:\n{server.log_tail(3000)}")
    finally:
        server.stop()


def _reference_png(path: str) -> str:
    """A reference picture with something to select: a red disc on a smooth background."""
    image = pl.reference_image(seed=5, w=192, h=144)
    ImageDraw.Draw(image).ellipse((60, 30, 140, 110), fill=(220, 30, 30))
    image.save(path)
    return path


class UIServer:
    """``launch.py`` with its UI, in its own process group, from a WebUI tree at ``webui``."""

    def __init__(self, webui: str, data_dir: str, log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [INFO["python"], "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all",
               "--no-half", "--server-name", "127.0.0.1", "--port", str(self.port), "--no-download-sd-model",
               "--skip-version-check", "--ckpt", os.path.join(data_dir, "models", "Stable-diffusion", "tiny_sd1.safetensors"),
               "--data-dir", data_dir]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=webui, env=build_host.host_env(INFO, data_dir), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=build_host.die_with_parent)

    def log_tail(self, chars: int = 5000) -> str:
        return log_tail(self.log_path, chars)

    def wait_ready(self) -> float:
        """Until the UI page and the extension's /ssr/version route answer."""
        t0 = time.time()
        while time.time() - t0 < START_TIMEOUT:
            if self.proc.poll() is not None:
                raise AssertionError(f"the WebUI exited with code {self.proc.returncode} while starting; "
                                     f"its log ends:\n{self.log_tail()}")
            try:
                for route in ("/", "/ssr/version"):
                    with urllib.request.urlopen(self.url + route, timeout=5) as r:
                        assert r.status == 200
                return time.time() - t0
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        raise AssertionError(f"the WebUI did not serve its UI within {START_TIMEOUT:.0f} s; its log ends:\n{self.log_tail()}")

    def stop(self) -> None:
        pids = server_pids(self.proc, self.port)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.killpg(os.getpgid(pid), sig)
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=20)
                if listening_pid(self.port) is None:
                    break
            except subprocess.TimeoutExpired:
                pass
        self._log.close()


@pytest.fixture
def say(capsys):
    def _say(text: str) -> None:
        with capsys.disabled():
            print(f"\n[browser test] {text}", flush=True)
    return _say


def test_browser_session(tmp_path, say):
    browser_python = browser_tools(INFO, "python3 tests/realhost/build_host.py")
    shots = screenshot_dir()
    say(f"screenshots: {shots}")
    assert not any(part.startswith(".") for part in str(tmp_path).split(os.sep)), \
        f"the test folder {tmp_path} lies below a dot-folder, which gradio refuses to serve files from"

    t0 = time.time()
    webui = str(tmp_path / "webui")
    shutil.copytree(INFO["webui"], webui, symlinks=True, ignore=shutil.ignore_patterns("_bundled_extensions"))
    data_dir = build_host.make_data_dir(str(tmp_path / "data"), INFO)
    reference = _reference_png(os.path.join(shots, "reference.png"))

    server = UIServer(webui, data_dir, os.path.join(shots, "webui.log"))
    try:
        say(f"WebUI with its UI serving at {server.url} after {server.wait_ready():.0f} s")
    except BaseException:
        server.stop()
        raise
    run_browser_session(browser_python, os.path.join(HERE, "browser_session.py"), server, reference, shots, say, "the WebUI")

    generated = Image.open(os.path.join(shots, "generated.png"))
    assert generated.size == (64, 64)
    assert np.asarray(generated.convert("L")).std() > 0, "the generated image is a flat colour"
    parameters = generated.info.get("parameters", "")
    assert "SSR-Encoder: True" in parameters and "SSR model: tiny_ssr.safetensors" in parameters, parameters
    names = sorted(os.listdir(shots))
    for stage in ("txt2img-accordion-closed", "accordion-filled", "preview-heatmap", "generated", "pnginfo", "restored"):
        assert any(re.match(rf"\d\d-{stage}\.png$", n) for n in names), f"no screenshot of '{stage}' in {shots}: {names}"
    say(f"passed in {time.time() - t0:.0f} s; screenshots: {shots}")
