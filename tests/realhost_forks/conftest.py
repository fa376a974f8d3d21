"""A real fork of the WebUI (reForge or Forge, from the source bundles) started in this process.

Run in the fork's own venv (built by ``python3 tests/realhost/build_host.py --forks``), with
``SSR_FORK`` naming the fork; ``bash tests/realhost_forks/run.sh`` does both forks:

    SSR_REALHOST=1 SSR_FORK=reforge <cache>/reforge-venv/bin/python -m pytest tests/realhost_forks

As for the WebUI (tests/realhost/conftest.py): a fresh ``--data-dir`` with this extension
``git clone``d into its ``extensions/`` and the cached random models linked into ``models/``;
the fork is started the way its ``webui.py --nowebui`` starts it (``initialize_forge()``,
``initialize.imports()``, ``initialize.initialize()``, the FastAPI app with the fork's ``Api``,
the ``app_started`` callbacks, its main-thread task loop) and driven through its HTTP API
in-process. Nothing of the fork is imitated.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "realhost"))
import build_host  # noqa: E402
from inprocess_api import ApiRequests, start_api  # noqa: E402

FORK = os.environ.get("SSR_FORK", "")
INFO_PATH = os.path.join(build_host.CACHE, "forks.json")
if FORK not in build_host.FORKS:
    raise pytest.UsageError(f"set SSR_FORK to one of {sorted(build_host.FORKS)}")
if not os.path.exists(INFO_PATH):
    raise pytest.UsageError(f"the forks are not built: run `python3 tests/realhost/build_host.py --forks` ({INFO_PATH} missing)")
INFO = json.load(open(INFO_PATH))
FORK_INFO = INFO[FORK]
_VENV = os.path.dirname(os.path.dirname(FORK_INFO["python"]))
if os.path.realpath(sys.prefix) != os.path.realpath(_VENV):
    raise pytest.UsageError(f"the {FORK} tests run in its venv: {FORK_INFO['python']} -m pytest tests/realhost_forks")

CKPT = "sd15_random.safetensors"
SSR_MODEL = "full_ssr.safetensors"
CLIP = "clip_vision/tiny-clip-vit"

DATA_DIR = tempfile.mkdtemp(prefix=f"ssr-{FORK}-")


def make_data_dir(dest: str) -> str:
    ext = os.path.join(dest, "extensions")
    os.makedirs(ext, exist_ok=True)
    build_host.clone_extension(os.path.join(ext, build_host.EXTENSION_NAME))
    models = os.path.join(dest, "models")
    os.makedirs(models, exist_ok=True)
    for entry in os.listdir(INFO["fork_models"]):
        os.symlink(os.path.join(INFO["fork_models"], entry), os.path.join(models, entry))
    config = {"sd_model_checkpoint": CKPT, "live_previews_enable": False, "show_progress_every_n_steps": -1,
              "samples_save": False, "grid_save": False, "enable_pnginfo": True, "sd_checkpoint_hash": ""}
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dest


make_data_dir(DATA_DIR)
os.environ.update({"HF_HOME": os.path.join(DATA_DIR, "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"})
EXTENSION_DIR = os.path.join(DATA_DIR, "extensions", build_host.EXTENSION_NAME)
MODELS = os.path.join(DATA_DIR, "models")
sys.path.insert(0, EXTENSION_DIR)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATA_DIR, ignore_errors=True)


class Fork(ApiRequests):
    """The started fork: ``client`` (TestClient on its app), ``shared``, ``script`` (the loaded
    SSR script module), ``name``."""

    def __init__(self):
        root = FORK_INFO["root"]
        self.name = FORK
        os.chdir(root)
        sys.path.insert(0, root)
        sys.argv = [os.path.join(root, "webui.py"), "--data-dir", DATA_DIR, "--skip-prepare-environment",
                    "--skip-torch-cuda-test", "--use-cpu", "all", "--always-cpu", "--no-half",
                    "--no-download-sd-model", "--skip-version-check", "--api", "--nowebui",
                    "--ckpt", os.path.join(MODELS, "Stable-diffusion", CKPT)]
        from modules_forge.initialization import initialize_forge

        initialize_forge()
        from modules import initialize

        initialize.imports()
        initialize.initialize()

        from modules_forge import main_thread

        threading.Thread(target=main_thread.loop, daemon=True).start()

        started = start_api(EXTENSION_DIR, "the fork")
        self.app, self.api, self.client = started.app, started.api, started.client
        self.shared, self.scripts, self.script = started.shared, started.scripts, started.script
        if not hasattr(self.shared.sd_model, "forge_objects"):  # Forge loads the checkpoint at the first generation
            self.txt2img(prompt="warm up", steps=1)

    @property
    def sd_model(self):
        return self.shared.sd_model

    @property
    def unet(self):
        """The UNet module both forks sample with (in the UNet patcher)."""
        return self.sd_model.forge_objects.unet.model.diffusion_model


_FORK = {}


@pytest.fixture(scope="session")
def fork() -> Fork:
    if "fork" not in _FORK:
        _FORK["fork"] = Fork()
    return _FORK["fork"]
