"""The real WebUI v1.10.1 (with sd-webui-controlnet v1.1.455) started in this process.

Run in the WebUI's own venv, after ``python3 tests/realhost/build_host.py``:

    SSR_REALHOST=1 .realhost/venv/bin/python -m pytest tests/realhost

Each session gets a fresh ``--data-dir`` (this extension ``git clone``d into its
``extensions/``, ControlNet beside it, the cached tiny models linked into ``models/``), then
the WebUI is started the way ``webui.py --nowebui`` starts it (``initialize.initialize()``,
the FastAPI app with the WebUI's ``Api``, the ``app_started`` callbacks) and driven through
its HTTP API in-process with ``fastapi.testclient``. Nothing of the WebUI is imitated.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build_host  # noqa: E402
from inprocess_api import ApiRequests, start_api  # noqa: E402

INFO_PATH = os.path.join(build_host.CACHE, "host.json")
if not os.path.exists(INFO_PATH):
    raise pytest.UsageError(f"the real host is not built: run `python3 tests/realhost/build_host.py` first ({INFO_PATH} missing)")
INFO = json.load(open(INFO_PATH))
_VENV = os.path.dirname(os.path.dirname(INFO["python"]))
if os.path.realpath(sys.prefix) != os.path.realpath(_VENV):
    raise pytest.UsageError(f"the real-host tests run in the WebUI's venv: {INFO['python']} -m pytest tests/realhost")

# The folder this extension is cloned into under extensions/. The WebUI loads extension scripts
# in the order of their folder names: the default (sd-webui-ssr-encoder) runs this extension's
# script after ControlNet's; a name sorting first (test_controlnet.py starts a second session in
# a subprocess with SSR_REALHOST_EXTENSION_FOLDER=00-ssr-encoder) runs it before.
EXTENSION_FOLDER = os.environ.get("SSR_REALHOST_EXTENSION_FOLDER") or build_host.EXTENSION_NAME
DATA_DIR = tempfile.mkdtemp(prefix="ssr-realhost-")
build_host.make_data_dir(DATA_DIR, INFO, extension_name=EXTENSION_FOLDER)
os.environ.update({k: v for k, v in build_host.host_env(INFO, DATA_DIR).items()
                   if k.startswith(("HF_", "TRANSFORMERS_", "TOKENIZERS_"))})
EXTENSION_DIR = os.path.join(DATA_DIR, "extensions", EXTENSION_FOLDER)
MODELS = os.path.join(DATA_DIR, "models")
TINY_CKPT = "tiny_sd1.safetensors"
FULL_CKPT = "full_sd1.safetensors"

# The clone's ``ssr`` is what the WebUI loads; the tests' references use the same files.
sys.path.insert(0, EXTENSION_DIR)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATA_DIR, ignore_errors=True)


class Host(ApiRequests):
    """The started WebUI: ``client`` (TestClient on the WebUI's app), ``shared``, ``script``
    (the loaded SSR script module)."""

    def __init__(self):
        webui = INFO["webui"]
        os.chdir(webui)
        sys.path.insert(0, webui)
        sys.argv = [os.path.join(webui, "webui.py"), "--data-dir", DATA_DIR, "--skip-prepare-environment",
                    "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--no-download-sd-model",
                    "--skip-version-check", "--api", "--nowebui",
                    "--ckpt", os.path.join(MODELS, "Stable-diffusion", TINY_CKPT)]
        from modules import initialize

        initialize.imports()
        initialize.initialize()

        from modules import shared

        shared.sd_model  # noqa: B018  (waits for the model that initialize() loads in a thread)
        started = start_api(EXTENSION_DIR, "the WebUI")
        self.app, self.api, self.client = started.app, started.api, started.client
        self.shared, self.scripts, self.script = started.shared, started.scripts, started.script

    @property
    def unet(self):
        return self.shared.sd_model.model.diffusion_model

    def set_options(self, **opts) -> None:
        r = self.client.post("/sdapi/v1/options", json=opts)
        assert r.status_code == 200, r.text

    def load_checkpoint(self, name: str) -> None:
        if os.path.basename(self.shared.sd_model.sd_checkpoint_info.filename) != name:
            self.set_options(sd_model_checkpoint=name)
        assert os.path.basename(self.shared.sd_model.sd_checkpoint_info.filename) == name


_HOST = {}


@pytest.fixture(scope="session")
def host() -> Host:
    if "host" not in _HOST:
        _HOST["host"] = Host()
    return _HOST["host"]


@pytest.fixture
def tiny_host(host) -> Host:
    host.load_checkpoint(TINY_CKPT)
    return host


@pytest.fixture
def full_host(host) -> Host:
    host.load_checkpoint(FULL_CKPT)
    return host


# Options that tests may leave changed: which checkpoint is loaded (tests switch back with
# load_checkpoint when they need the tiny one).
_OPTIONS_TESTS_MAY_CHANGE = {"sd_model_checkpoint", "sd_checkpoint_hash"}


@pytest.fixture(autouse=True)
def options_left_as_found():
    """Fail a test that leaves a WebUI option changed (e.g. an ``override_settings`` the WebUI
    does not restore): every later test would run with it, and plain images would differ
    between test modules for no reason the failing test could show."""
    if "host" not in _HOST:  # the in-process WebUI is not running (yet): nothing to compare
        yield
        return
    opts = _HOST["host"].shared.opts
    before = dict(opts.data)
    yield
    changed = {k: (before.get(k, opts.get_default(k)), v) for k, v in opts.data.items()
               if k not in _OPTIONS_TESTS_MAY_CHANGE and before.get(k, opts.get_default(k)) != v}
    assert not changed, f"the test left WebUI options changed (before, after): {changed}"

