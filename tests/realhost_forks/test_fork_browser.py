"""The browser test on Forge (gradio 4.40; issue 12 item 6): Forge started with its UI as a user
starts it (``launch.py`` from the Forge folder in its venv, bound to 127.0.0.1, this
extension ``git clone``d into the data dir's extensions), used in headless Chromium by
browser_session_gradio4.py: the accordion, the weights, an upload into Subject 1's
``ImageEditor``, a stroke painted over the subject with the mouse (mask mode, no query),
Preview, a 64x64 generation whose info and PNG say ``SSR 1 mode: mask``.

The pieces are those of tests/realhost/test_browser.py (its ``UIServer`` waits for the UI and
stops the server's process group; its screenshot folder and reference picture; the session
runs in the browser venv, selenium kept out of the fork's venv). The screenshots, the
generated PNG and Forge's log go to ``$SSR_SCREENSHOT_DIR`` or a new
``/tmp/ssr-browser-screenshots/<time>-forge``, printed as ``screenshots: <path>`` and kept.

Forge only: reForge runs gradio 3.41.2 with the WebUI's own UI, which test_browser.py covers
on v1.10.1. Forge serves files (its own ``script.js`` and ``javascript/`` included) only from
its allowed paths, which are the data dir alone when ``--data-dir`` is given: the server gets
``--gradio-allowed-path <Forge folder>`` (a user with a separate data dir needs the same).
gradio 4.40 has no rule against dot-folders (the cache may stay under ``~/.cache``).

Runs first of this folder's files (file order): its server has stopped before
test_fork_http.py starts its own and before the in-process fork starts (at its first test).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import CKPT, FORK, FORK_INFO, INFO, make_data_dir

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "realhost"))
import build_host  # noqa: E402
import test_browser as a1111  # noqa: E402  (its UIServer, tool checks, session runner, reference picture)
from servers import free_port  # noqa: E402
from test_browser import say  # noqa: E402,F401  (the fixture)

pytestmark = pytest.mark.skipif(FORK != "forge", reason="gradio 4 UI is Forge's; reForge has the WebUI's gradio 3.41.2 UI, "
                                                        "covered by tests/realhost/test_browser.py")


class ForgeUIServer(a1111.UIServer):
    """Forge's ``launch.py`` with its UI (no ``--nowebui``), on the CPU, in its own process group."""

    def __init__(self, data_dir: str, log_path: str):  # noqa: D107 - same fields as UIServer
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        root = os.path.realpath(FORK_INFO["root"])  # gradio compares resolved paths with the allowed ones
        cmd = [sys.executable, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all",
               "--always-cpu", "--no-half", "--server-name", "127.0.0.1", "--port", str(self.port),
               "--data-dir", data_dir, "--gradio-allowed-path", root, "--no-download-sd-model", "--skip-version-check",
               "--ckpt", os.path.join(data_dir, "models", "Stable-diffusion", CKPT)]
        env = dict(build_host.host_env(FORK_INFO, data_dir), GRADIO_ANALYTICS_ENABLED="False")
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=build_host.die_with_parent)


def test_forge_ui_mask_preview_generate(tmp_path, say):
    browser_python = a1111.browser_tools(INFO, "python3 tests/realhost/build_host.py --forks")
    shots = a1111.screenshot_dir("-forge")
    say(f"screenshots: {shots}")

    t0 = time.time()
    data_dir = make_data_dir(str(tmp_path / "data"))
    config_path = os.path.join(data_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["ssr_encoder_slots"] = 1  # one ImageEditor per tab: each is a WebGL canvas, slow in software
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    reference = a1111._reference_png(os.path.join(shots, "reference.png"))
    server = ForgeUIServer(data_dir, os.path.join(shots, "forge.log"))
    try:
        say(f"Forge with its UI serving at {server.url} after {server.wait_ready():.0f} s")
    except BaseException:
        server.stop()
        raise
    a1111.run_browser_session(browser_python, os.path.join(HERE, "browser_session_gradio4.py"), server, reference, shots,
                              say, "Forge")

    generated = Image.open(os.path.join(shots, "generated.png"))
    assert generated.size == (64, 64)
    assert np.asarray(generated.convert("L")).std() > 0, "the generated image is a flat colour"
    parameters = generated.info.get("parameters", "")
    for expected in ("SSR-Encoder: True", "SSR 1 mode: mask", "SSR model: full_ssr.safetensors"):
        assert expected in parameters, parameters
    assert "SSR error" not in parameters and "not applied" not in parameters, parameters
    names = sorted(os.listdir(shots))
    for stage in ("txt2img-accordion-closed", "reference-uploaded", "mask-painted", "preview-heatmap", "generated"):
        assert any(n[2:].startswith(f"-{stage}") for n in names), f"no screenshot of '{stage}' in {shots}: {names}"
    say(f"passed in {time.time() - t0:.0f} s; screenshots: {shots}")
