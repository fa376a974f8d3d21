"""The extension's /ssr/* routes without a host (FastAPI app + a runtime stand-in): they use
the WebUI's --api-auth credentials when set, never reveal absolute server paths, and do the
preview's model work only under the generation lock and only for bounded input.

The real-host suite checks the same against a running WebUI; here the routes module is
driven directly, so these tests need neither the WebUI nor a model.
"""
from __future__ import annotations

import base64
import contextlib
import io
import os

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import ssr  # noqa: E402
from ssr_webui import routes  # noqa: E402
from ssr_webui.model_files import ModelFile, ModelListing  # noqa: E402


class FakeRuntime:
    """Folders and listing as the real runtime reports them (absolute paths)."""

    def __init__(self, root):
        self.models = os.path.join(str(root), "webui", "models")
        self.ssr_dir = os.path.join(self.models, "ssr_encoder")
        self.clip_dir = os.path.join(self.models, "clip_vision")
        self.previews = []
        self.error = None
        self.lock_held = None

    def ssr_folder(self):
        return self.ssr_dir

    def clip_folders(self):
        return [("ssr_encoder", self.ssr_dir), ("clip_vision", self.clip_dir)]

    def list_models(self):
        ssr_file = ModelFile("release/pytorch_model.bin", os.path.join(self.ssr_dir, "release", "pytorch_model.bin"), "ssr",
                             (os.path.join(self.ssr_dir, "release", "pytorch_model.bin"),))
        clip_file = ModelFile("clip_vision/vit-l", os.path.join(self.clip_dir, "vit-l"), "clip", ())
        return ModelListing(ssr=[ssr_file], clip=[clip_file],
                            ignored=[(os.path.join(self.ssr_dir, "cut", "pytorch_model.bin"), "truncated; re-download it")],
                            folders={"ssr": [self.ssr_dir], "clip": [self.ssr_dir, self.clip_dir]},
                            roots=[("ssr_encoder", self.ssr_dir), ("clip_vision", self.clip_dir)])

    def preview(self, subject, model, clip_model, sd_model):
        self.previews.append(subject)
        self.lock_held = LOCK.held
        if self.error is not None:
            raise self.error
        listing = self.list_models()
        return torch.rand(16, 16), None, listing.ssr[0], listing.clip[0]


class RecordingLock:
    def __init__(self):
        self.held = False

    @contextlib.contextmanager
    def __call__(self):
        self.held = True
        try:
            yield
        finally:
            self.held = False


LOCK = RecordingLock()


def _client(runtime, api_auth=None):
    app = FastAPI()
    routes.register(app, runtime, lambda: object(), LOCK, api_auth=api_auth)
    return TestClient(app)


def _png(width=64, height=48):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_api_auth_is_required_when_configured(tmp_path):
    client = _client(FakeRuntime(tmp_path), api_auth="alice:secret,bob:pa:ss")
    for method, path in (("get", "/ssr/version"), ("get", "/ssr/models"), ("post", "/ssr/preview")):
        response = getattr(client, method)(path, **({"json": {"image": _png()}} if method == "post" else {}))
        assert response.status_code == 401, path
        assert response.headers.get("www-authenticate", "").lower().startswith("basic"), path
        wrong = getattr(client, method)(path, auth=("alice", "nope"), **({"json": {}} if method == "post" else {}))
        assert wrong.status_code == 401 and wrong.headers.get("www-authenticate", "").lower().startswith("basic")
    assert client.get("/ssr/version", auth=("alice", "secret")).status_code == 200
    assert client.get("/ssr/models", auth=("bob", "pa:ss")).status_code == 200  # the password may hold ':'
    assert client.get("/ssr/models", auth=("carol", "secret")).status_code == 401


def test_open_without_api_auth(tmp_path):
    client = _client(FakeRuntime(tmp_path), api_auth=None)
    assert client.get("/ssr/version").json()["extension"] == "SSR-Encoder"


def test_models_lists_no_absolute_paths(tmp_path):
    runtime = FakeRuntime(tmp_path)
    body = _client(runtime).get("/ssr/models").json()
    text = str(body)
    assert str(tmp_path) not in text and runtime.models not in text
    assert [m["name"] for m in body["ssr_models"]] == ["release/pytorch_model.bin"]
    assert body["ignored"] == [{"file": "ssr_encoder/cut/pytorch_model.bin", "reason": "truncated; re-download it"}]
    assert body["folders"] == {"ssr": ["ssr_encoder"], "clip": ["ssr_encoder", "clip_vision"]}


def test_preview_errors_name_no_absolute_paths(tmp_path):
    runtime = FakeRuntime(tmp_path)
    bad = os.path.join(runtime.ssr_dir, "release", "pytorch_model.bin")
    runtime.error = ssr.WeightFileError(f"{bad}: truncated safetensors file; re-download it")
    response = _client(runtime).post("/ssr/preview", json={"image": _png(), "query": "the dog"})
    assert response.status_code == 500
    detail = response.json()["detail"]
    assert str(tmp_path) not in detail and "ssr_encoder/release/pytorch_model.bin: truncated" in detail


def test_preview_runs_under_the_generation_lock_and_bounds_input(tmp_path):
    runtime = FakeRuntime(tmp_path)
    client = _client(runtime)
    ok = client.post("/ssr/preview", json={"image": _png(), "query": "the dog"})
    assert ok.status_code == 200, ok.text
    assert runtime.lock_held is True and LOCK.held is False
    huge = client.post("/ssr/preview", json={"image": _png(5000, 4000), "query": "the dog"})
    assert huge.status_code == 422 and "pixels" in huge.json()["detail"]
    long_query = client.post("/ssr/preview", json={"image": _png(), "query": "dog " * 5000})
    assert long_query.status_code == 422
    assert len(runtime.previews) == 1  # the refused requests did no model work
