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

Security: routes added in ``on_app_started`` do not get the WebUI API's ``--api-auth``
check by themselves (docs/webui-host-notes.md, section 4), so the same HTTP Basic check is
added here from ``shared.cmd_opts.api_auth`` ("user:password,user2:password2"). Files and
folders are named relative to the search folders ("ssr_encoder/...", "clip_vision/..."),
never by absolute server paths, in results and in error messages. The preview does its
model work under the generation lock, on input bounded like a generation's.
"""
from __future__ import annotations

import secrets
from typing import Any, Callable, Dict, Optional

import ssr

from .preview import heatmap_overlay, png_base64
from .request import ArgumentError, parse_subject
from .runtime import ModelMismatch, scrub_paths

API_VERSION = 1
PREVIEW_FIELDS = ("image", "query", "mask", "mask_weight", "model", "clip_model")
_FROM_WEBUI = object()


def webui_api_auth() -> Optional[str]:
    """The WebUI's ``--api-auth`` value, or None (not set, or not inside the WebUI)."""
    try:
        from modules import shared
    except Exception:  # noqa: BLE001 - not in the WebUI
        return None
    return getattr(getattr(shared, "cmd_opts", None), "api_auth", None) or None


def parse_api_auth(api_auth: str) -> Dict[str, str]:
    """"user:password,user2:password2" -> {user: password}; a password may contain ':'."""
    credentials = {}
    for entry in api_auth.split(","):
        user, sep, password = entry.strip().partition(":")
        if sep and user:
            credentials[user] = password
    return credentials


def basic_auth_dependency(api_auth: Optional[str]) -> Optional[Callable]:
    """A FastAPI dependency that accepts only the ``api_auth`` credentials (HTTP Basic; 401
    with ``WWW-Authenticate: Basic`` otherwise), or None when no credentials are configured."""
    if not api_auth:
        return None
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    known = [(user.encode(), password.encode()) for user, password in parse_api_auth(api_auth).items()]
    basic = HTTPBasic()  # answers 401 + WWW-Authenticate: Basic when no credentials are sent

    def check(credentials=Depends(basic)) -> bool:
        user, password = credentials.username.encode(), credentials.password.encode()
        accepted = False
        for known_user, known_password in known:  # compare with every entry: timing says nothing
            same = secrets.compare_digest(user, known_user) & secrets.compare_digest(password, known_password)
            accepted = accepted or same
        if not accepted:
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True

    return check


def register(app, runtime, get_sd_model, lock_factory, api_auth: Any = _FROM_WEBUI) -> None:
    """Add the routes to ``app``. ``get_sd_model()`` -> the loaded model; ``lock_factory()``
    -> a context manager serialising GPU work with generation (the WebUI's queue lock).
    ``api_auth``: "user:password,..." to require, None for open routes; by default the
    WebUI's ``--api-auth`` setting."""
    from fastapi import Body, Depends, HTTPException

    if api_auth is _FROM_WEBUI:
        api_auth = webui_api_auth()
    check = basic_auth_dependency(api_auth)
    dependencies = [Depends(check)] if check is not None else None

    def version() -> Dict[str, Any]:
        return {"extension": "SSR-Encoder", "version": ssr.__version__, "api": API_VERSION}

    def models() -> Dict[str, Any]:
        listing = runtime.list_models()
        return {
            "ssr_models": [{"name": m.name, "files": len(m.files)} for m in listing.ssr],
            "clip_models": [{"name": m.name} for m in listing.clip],
            "folders": {kind: [listing.display(f) for f in folders] for kind, folders in listing.folders.items()},
            "ignored": [{"file": listing.display(path), "reason": listing.scrub(why)} for path, why in listing.ignored],
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
            raise HTTPException(status_code=422, detail=scrub_paths(runtime, str(e))) from e
        except (ModelMismatch, ssr.IncompatibleUNetError) as e:
            raise HTTPException(status_code=409, detail=scrub_paths(runtime, f"model: {e}")) from e
        except ssr.WeightFileError as e:
            raise HTTPException(status_code=500, detail=scrub_paths(runtime, f"weights: {e}")) from e
        grid = heatmap.shape[-1]
        return {
            "mode": subject.mode,
            "grid": grid,
            "attention_map": [[round(float(v), 5) for v in row] for row in heatmap.tolist()],
            "heatmap": png_base64(heatmap_overlay(subject.image, heatmap, mask=subject.mask)),
            "model": ssr_file.name,
            "clip_model": clip_file.name,
        }

    app.add_api_route("/ssr/version", version, methods=["GET"], dependencies=dependencies)
    app.add_api_route("/ssr/models", models, methods=["GET"], dependencies=dependencies)
    app.add_api_route("/ssr/preview", preview, methods=["POST"], dependencies=dependencies)
