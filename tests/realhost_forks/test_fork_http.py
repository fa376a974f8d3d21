"""End to end over HTTP: the fork started as a user starts it (``launch.py --nowebui --api``
in its own process, this extension cloned into its extensions folder), driven over a real
socket. One run: the preview route before any generation, plain vs SSR (two subjects, one
by text, one by a painted mask; prompt = negative prompt) vs scale 0, the built-in
IP-Adapter alone and with SSR, then plain again (nothing of ours or of the IP-Adapter was
left installed: the same pixels as the first plain image).

Runs before the in-process tests (file order), so the two fork processes never overlap.
"""
from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import CKPT, CLIP, FORK, FORK_INFO, SSR_MODEL, make_data_dir

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "realhost"))
import payloads as pl  # noqa: E402
from servers import free_port  # noqa: E402

STARTUP_S = 900


@pytest.fixture(scope="module")
def server():
    data_dir = make_data_dir(tempfile.mkdtemp(prefix=f"ssr-{FORK}-http-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update({"HF_HOME": os.path.join(data_dir, "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    cmd = [sys.executable, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all",
           "--always-cpu", "--no-half", "--api", "--nowebui", "--server-name", "127.0.0.1", "--port", str(port),
           "--data-dir", data_dir, "--no-download-sd-model", "--skip-version-check",
           "--ckpt", os.path.join(data_dir, "models", "Stable-diffusion", CKPT)]
    log = open(os.path.join(data_dir, "server.log"), "w")
    proc = subprocess.Popen(cmd, cwd=FORK_INFO["root"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{FORK} exited ({proc.returncode}): {open(log.name).read()[-3000:]}")
            try:
                if requests.get(url + "/sdapi/v1/sd-models", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{FORK} did not answer within {STARTUP_S} s: {open(log.name).read()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)


def _txt2img(url, **payload):
    payload = dict(dict(width=64, height=64, steps=2, sampler_name="Euler", cfg_scale=5.0, seed=77,
                        prompt="a toy on a table", negative_prompt="a toy on a table"), **payload)
    r = requests.post(url + "/sdapi/v1/txt2img", json=payload, timeout=900)
    assert r.status_code == 200, r.text[:2000]
    data = r.json()
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).convert("RGB")).astype(np.int16)
    return image, data["info"]


def test_plain_ssr_scale0_over_http(server):
    subjects = [
        {"image": pl.encode(pl.reference_image(0)), "query": "the red thing", "weight": 1.0},
        {"image": pl.encode(pl.reference_image(1)), "mask": pl.encode(pl.box_mask()), "weight": 1.0},
    ]
    unit = pl.ssr_unit(*subjects, scale=0.7, model=SSR_MODEL, clip_model=CLIP)
    # The preview route before any generation (Forge loads the checkpoint only then).
    r = requests.post(server + "/ssr/preview", json={"image": subjects[0]["image"], "query": "the red thing",
                                                      "model": SSR_MODEL, "clip_model": CLIP}, timeout=600)
    assert r.status_code == 200, r.text[:2000]
    assert r.json()["mode"] == "text" and r.json()["grid"] > 1, {k: v for k, v in r.json().items() if k != "heatmap"}
    plain, _ = _txt2img(server)
    with_ssr, info = _txt2img(server, alwayson_scripts=pl.alwayson(unit))
    assert "SSR error" not in info and "not applied" not in info, info
    assert "SSR-Encoder: True" in info and "SSR 2 mode: mask" in info, info
    assert np.abs(with_ssr - plain).max() > 0
    zero, info0 = _txt2img(server, alwayson_scripts=pl.alwayson(dict(unit, scale=0.0)))
    assert np.array_equal(zero, plain), info0

    # The fork's built-in IP-Adapter (a ControlNet unit) with SSR, then alone again.
    models = requests.get(server + "/controlnet/model_list", timeout=60)
    assert models.status_code == 200, models.text[:500]
    ip_models = [n for n in models.json()["model_list"] if n.startswith("ip-adapter_sd15_random")]
    assert ip_models, models.json()
    ip_model = ip_models[0]
    ip_unit = {"enabled": True, "module": "CLIP-ViT-H (IPAdapter)", "model": ip_model, "weight": 0.8,
               "image": pl.encode(pl.reference_image(5, 224, 224)), "resize_mode": "Crop and Resize"}
    ip_only, ip_info = _txt2img(server, alwayson_scripts={"ControlNet": {"args": [ip_unit]}})
    both, both_info = _txt2img(server, alwayson_scripts=dict({"ControlNet": {"args": [ip_unit]}}, **pl.alwayson(unit)))
    assert "SSR-Encoder: True" in both_info and "SSR error" not in both_info, both_info
    assert np.abs(ip_only - plain).max() > 0, f"the IP-Adapter changed nothing: {ip_info}"
    assert np.abs(both - ip_only).max() > 0, "SSR changed nothing beside the IP-Adapter"

    again, _ = _txt2img(server)
    assert np.array_equal(again, plain)
