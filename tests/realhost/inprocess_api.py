"""A host (the WebUI, reForge or Forge) served in this process through its own HTTP API, the
way its ``webui.py --nowebui`` serves it, for tests/realhost/conftest.py and
tests/realhost_forks/conftest.py.

Each conftest runs in its host's own venv and imports that host's ``modules``; this module is
imported before the host is started, so the host's modules are imported inside the functions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class StartedApi:
    app: Any  # the FastAPI app
    api: Any  # the host's modules.api.api.Api on it
    client: Any  # fastapi.testclient.TestClient on the app
    shared: Any  # the host's modules.shared
    scripts: Any  # the host's modules.scripts
    script: Any  # the SSR-Encoder script module the host loaded from extension_dir


def start_api(extension_dir: str, host: str) -> StartedApi:
    """After the host's ``initialize.initialize()``: a FastAPI app with the host's middleware and
    ``Api``, the ``before_ui`` and ``app_started`` callbacks, a TestClient on it, and the script
    the host loaded from ``extension_dir``. ``host`` names the host in the error raised when that
    script was not loaded."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import initialize_util, script_callbacks, scripts, shared
    from modules.api.api import Api
    from modules.call_queue import queue_lock

    app = FastAPI()
    initialize_util.setup_middleware(app)
    api = Api(app, queue_lock)
    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    script = None
    for data in scripts.scripts_data:
        if os.path.realpath(data.path).startswith(os.path.realpath(extension_dir)):
            script = data.module
    if script is None:
        raise RuntimeError(f"the SSR-Encoder script was not loaded by {host}")
    return StartedApi(app, api, client, shared, scripts, script)


class ApiRequests:
    """HTTP calls on a started host's ``client``, with the small generation defaults the
    real-host tests use."""

    client: Any

    def post(self, route: str, payload: dict, status: int = 200) -> dict:
        r = self.client.post(route, json=payload)
        assert r.status_code == status, f"{route}: HTTP {r.status_code}: {r.text[:2000]}"
        return r.json()

    def txt2img(self, **payload) -> dict:
        return self.post("/sdapi/v1/txt2img", _generation_defaults(payload, steps=3))

    def img2img(self, **payload) -> dict:
        return self.post("/sdapi/v1/img2img", _generation_defaults(payload, steps=4))


def _generation_defaults(payload: dict, steps: int) -> dict:
    """``payload`` with 64x64, ``steps`` Euler steps, CFG 5 and seed 1234 where it sets none."""
    payload.setdefault("width", 64)
    payload.setdefault("height", 64)
    payload.setdefault("steps", steps)
    payload.setdefault("sampler_name", "Euler")
    payload.setdefault("cfg_scale", 5.0)
    payload.setdefault("seed", 1234)
    return payload
