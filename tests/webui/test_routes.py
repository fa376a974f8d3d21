"""GET /ssr/version, GET /ssr/models, POST /ssr/preview through FastAPI's TestClient."""
from __future__ import annotations

import base64
import copy
import io

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

import ssr

from ssr_webui_testenv import CLIP, PAIR, SINGLE, box_mask, harness, png_b64, reference_image, start


@pytest.fixture(scope="module")
def client(_session_models_path, sd_model_pristine):
    app = FastAPI()
    env = start(copy.deepcopy(sd_model_pristine), app=app)
    yield TestClient(app), env
    harness.reset_webui_state()


def test_version(client):
    body = client[0].get("/ssr/version").json()
    assert body == {"extension": "SSR-Encoder", "version": ssr.__version__, "api": 1}


def test_models_lists_choices_and_ignored_files(client):
    body = client[0].get("/ssr/models").json()
    assert [m["name"] for m in body["ssr_models"]] == [PAIR, SINGLE]
    assert [m["files"] for m in body["ssr_models"]] == [2, 1]
    assert [m["name"] for m in body["clip_models"]] == [CLIP]
    assert [i["file"].rsplit("/", 1)[-1] for i in body["ignored"]] == ["notes.bin"]
    assert body["folders"]["ssr"][0].endswith("models/ssr_encoder")


def test_preview_returns_the_attention_map(client, core_embedder):
    image = reference_image(1)
    response = client[0].post("/ssr/preview", json={"image": png_b64(image), "query": "a dog", "model": SINGLE, "clip_model": CLIP})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["mode"], body["grid"], body["model"], body["clip_model"]) == ("text", 16, SINGLE, CLIP)
    attention = np.array(body["attention_map"])
    assert attention.shape == (16, 16) and attention.min() >= 0 and attention.max() == pytest.approx(1.0)
    expected, _ = core_embedder.preview(ssr.Subject(image, "a dog"))  # direct computation
    np.testing.assert_allclose(attention, expected.numpy(), atol=1e-4)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap"])))
    assert overlay.format == "PNG" and overlay.size == (336, 336)


def test_preview_with_mask(client):
    body = client[0].post("/ssr/preview", json={"image": png_b64(reference_image(1)), "mask": png_b64(box_mask()),
                                                "mask_weight": 5}).json()
    assert body["mode"] == "mask" and np.array(body["attention_map"]).shape == (16, 16)
    assert body["model"] == PAIR  # default: the first weights found


@pytest.mark.parametrize("payload,status,detail", [
    ({"query": "a dog"}, 422, "image: missing"),
    ({"image": "%%", "query": "a dog"}, 422, "image: not valid base64"),
    ({"image": "IMAGE"}, 422, "query: give a query text"),
    ({"image": "IMAGE", "query": "a dog", "mask_weight": 50}, 422, "mask_weight:"),
    ({"image": "IMAGE", "query": "a dog", "model": "nope"}, 422, "model: 'nope' not found"),
    ({"image": "IMAGE", "query": "a dog", "clip_model": 3}, 422, "clip_model:"),
    ({"image": "IMAGE", "query": "a dog", "weight": 1}, 422, "body: unknown keys ['weight']"),
])
def test_preview_errors_name_the_field(client, payload, status, detail):
    payload = {k: png_b64(reference_image(1)) if v == "IMAGE" else v for k, v in payload.items()}
    response = client[0].post("/ssr/preview", json=payload)
    assert response.status_code == status
    assert response.json()["detail"].startswith(detail)


def test_preview_with_sdxl_loaded_is_a_conflict(client):
    from ssr_webui_testenv import tiny_sd
    from modules import shared
    env = client[1]
    saved = shared.sd_model
    shared.sd_model = tiny_sd.make_tiny_sdxl_model()
    try:
        response = client[0].post("/ssr/preview", json={"image": png_b64(reference_image(1)), "query": "a dog"})
    finally:
        shared.sd_model = saved
    assert response.status_code == 409
    assert "SDXL" in response.json()["detail"]
    assert env.runtime.active is None
