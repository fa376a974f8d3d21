"""HTTP routes, added on app start (``script_callbacks.on_app_started``):

- ``GET /ssr/version``: extension and API versions;
- ``GET /ssr/models``: the SSR and CLIP weight choices (names to send as ``model`` /
  ``clip_model``), the folders searched, and files that were found but not recognised;
- ``POST /ssr/preview``: ``{"image", "query", "mask", "mask_weight", "model", "clip_model"}``
  -> the token-to-patch attention of the query over the image: ``attention_map`` (grid x grid
  floats in [0, 1], patch rows top to bottom, over the centred square CLIP sees) and
  ``heatmap`` (a PNG, base64, of the map over that square).

Errors: 422 with ``detail`` naming the field for invalid input; 409 when the loaded
checkpoint cannot take SSR weights (SDXL, SD2 ...); 500 when a weight file fails to load.
Bodies are plain dicts (validated here), so the routes work with FastAPI on pydantic v1
(the WebUI's pin) and v2.
"""
from __future__ import annotations

from typing import Any, Dict

import ssr

from .preview import heatmap_overlay, png_base64
from .request import ArgumentError, parse_subject
from .runtime import ModelMismatch

API_VERSION = 1
PREVIEW_FIELDS = ("image", "query", "mask", "mask_weight", "model", "clip_model")


def register(app, runtime, get_sd_model, lock_factory) -> None:
    """Add the routes to ``app``. ``get_sd_model()`` -> the loaded model; ``lock_factory()``
    -> a context manager serialising GPU work with generation (the WebUI's queue lock)."""
    from fastapi import Body, HTTPException

    def version() -> Dict[str, Any]:
        return {"extension": "SSR-Encoder", "version": ssr.__version__, "api": API_VERSION}

    def models() -> Dict[str, Any]:
        listing = runtime.list_models()
        return {
            "ssr_models": [{"name": m.name, "files": len(m.files)} for m in listing.ssr],
            "clip_models": [{"name": m.name} for m in listing.clip],
            "folders": listing.folders,
            "ignored": [{"file": path, "reason": why} for path, why in listing.ignored],
        }

    def preview(payload: Dict[str, Any] = Body(...)) -> Dict[str, Any]:
        if not isinstance(payload, dict):
            raise HTTPException(status_code=422, detail="body: expected a JSON object")
        unknown = sorted(set(payload) - set(PREVIEW_FIELDS))
        if unknown:
            raise HTTPException(status_code=422, detail=f"body: unknown keys {unknown}; expected some of {list(PREVIEW_FIELDS)}")
        try:
            if payload.get("image") is None:
                raise ArgumentError("image", "missing; send the reference image as base64 or a data URL")
            for name in ("model", "clip_model"):
                if payload.get(name) is not None and not isinstance(payload[name], str):
                    raise ArgumentError(name, "expected a name from GET /ssr/models")
            subject = parse_subject(payload.get("image"), payload.get("query"), None, payload.get("mask_weight"),
                                    mask_value=payload.get("mask"), prefix="", slot=0, explicit_mask="mask" in payload)
            with lock_factory():
                heatmap, _, ssr_file, clip_file = runtime.preview(subject, payload.get("model"), payload.get("clip_model"),
                                                                  get_sd_model())
        except ArgumentError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        except (ModelMismatch, ssr.IncompatibleUNetError) as e:
            raise HTTPException(status_code=409, detail=f"model: {e}") from e
        except ssr.WeightFileError as e:
            raise HTTPException(status_code=500, detail=f"weights: {e}") from e
        grid = heatmap.shape[-1]
        return {
            "mode": subject.mode,
            "grid": grid,
            "attention_map": [[round(float(v), 5) for v in row] for row in heatmap.tolist()],
            "heatmap": png_base64(heatmap_overlay(subject.image, heatmap, mask=subject.mask)),
            "model": ssr_file.name,
            "clip_model": clip_file.name,
        }

    app.add_api_route("/ssr/version", version, methods=["GET"])
    app.add_api_route("/ssr/models", models, methods=["GET"])
    app.add_api_route("/ssr/preview", preview, methods=["POST"])
