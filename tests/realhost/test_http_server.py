"""End to end over HTTP (issue 8, item 4): the real WebUI v1.10.1 server, started as a user
starts it (``launch.py --api --nowebui`` bound to 127.0.0.1, in the WebUI's venv, with this
extension ``git clone``d and sd-webui-controlnet beside it), driven with the ``webuiapi``
client and plain HTTP.

Every SSR case is compared with plain generations made by the same server: SSR changes the
image, scale 0 and every rejected request give exactly the plain image, and a plain
generation after each case equals the plain one made before any (no hook left behind).

These tests start their own server processes; they never use the in-process ``host``
fixture of conftest.py.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

import build_host
import payloads as pl
from servers import free_port, listening_pid, log_tail, server_pids

INFO = json.load(open(os.path.join(build_host.CACHE, "host.json")))
START_TIMEOUT = float(os.environ.get("SSR_HTTP_START_TIMEOUT", "300"))
REQUEST_TIMEOUT = 600
TINY_CKPT, FULL_CKPT = "tiny_sd1.safetensors", "full_sd1.safetensors"
QUERY = "the red thing"
AUTH = ("user", "pass")


# ------------------------------------------------------------------------------ the server

class Server:
    """One ``launch.py`` process with its own --data-dir; stopped with its process group."""

    def __init__(self, name: str, extra_args=(), controlnet: bool = True, ckpt: str = TINY_CKPT):
        self.data_dir = tempfile.mkdtemp(prefix=f"ssr-http-{name}-")
        build_host.make_data_dir(self.data_dir, INFO, controlnet=controlnet)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.data_dir, "server.log")
        self.auth = None
        cmd = [INFO["python"], "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all",
               "--no-half", "--api", "--nowebui", "--server-name", "127.0.0.1", "--port", str(self.port),
               "--no-download-sd-model", "--ckpt", os.path.join(self.data_dir, "models", "Stable-diffusion", ckpt),
               "--data-dir", self.data_dir, *extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=INFO["webui"], env=build_host.host_env(INFO, self.data_dir),
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True,
                                     preexec_fn=build_host.die_with_parent)

    def log_tail(self, chars: int = 6000) -> str:
        return log_tail(self.log_path, chars)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Poll GET /ssr/version (the extension's route: the server is up and the extension's
        routes are registered) until it answers; 401 counts as up for a server with --api-auth."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the WebUI exited with code {self.proc.returncode} while starting; "
                                   f"its log:\n{self.log_tail()}")
            try:
                r = requests.get(self.url + "/ssr/version", timeout=5, auth=self.auth)
                if r.status_code == 200 or (r.status_code == 401 and self.auth is None):
                    return time.time() - t0
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the WebUI did not answer GET /ssr/version within {timeout:.0f} s; its log:\n{self.log_tail()}")

    def client(self, **kw) -> webuiapi.WebUIApi:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=self.port, sampler="Euler", steps=3, **kw)
        request = api.session.request
        api.session.request = lambda *a, **k: request(*a, **{"timeout": REQUEST_TIMEOUT, **k})
        return api

    def stop(self) -> None:
        pids = server_pids(self.proc, self.port)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.killpg(os.getpgid(pid), sig)
                except (OSError, ProcessLookupError):
                    pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                continue
            if all(not _alive(pid) for pid in pids - {self.proc.pid}):
                break
        self._log.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def server():
    srv = Server("main")
    try:
        srv.started_in = srv.wait_ready()
        print(f"\n[http] WebUI answered after {srv.started_in:.0f} s on port {srv.port}")
        owner = listening_pid(srv.port)
        assert owner is not None and os.getsid(owner) == srv.proc.pid, \
            f"port {srv.port} is held by pid {owner}, not by the server started here ({srv.proc.pid})"
        srv.api = srv.client()
        first = txt2img(srv.api)
        srv.plain = txt2img(srv.api)
        assert same(first.image, srv.plain.image), "two plain generations differ: the comparisons below mean nothing"
        assert "SSR" not in srv.plain.info["infotexts"][0]
        srv.ssr_cache = {}
    except BaseException:
        srv.stop()
        srv.cleanup()
        raise
    try:
        yield srv
    finally:
        srv.stop()
        srv.cleanup()
    assert listening_pid(srv.port) is None, f"something still listens on port {srv.port} after stopping the server"


@pytest.fixture(scope="module")
def auth_server():
    srv = Server("auth", extra_args=("--api-auth", f"{AUTH[0]}:{AUTH[1]}"), controlnet=False)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
        srv.cleanup()


# ------------------------------------------------------------------------------ helpers

def txt2img(api, unit=None, scripts=None, **kw) -> webuiapi.WebUIApiResult:
    payload = dict(prompt="a photo of a cat", negative_prompt="blurry", seed=1234, width=64, height=64, steps=3,
                   cfg_scale=5.0, sampler_name="Euler")
    payload.update(kw)
    alwayson = dict(scripts or {})
    if unit is not None:
        alwayson[pl.TITLE] = {"args": unit if isinstance(unit, list) else [unit]}
    return api.txt2img(alwayson_scripts=alwayson, **payload)


def img2img(api, unit=None, **kw) -> webuiapi.WebUIApiResult:
    payload = dict(images=[pl.reference_image(7, 64, 64)], prompt="a photo of a cat", negative_prompt="blurry",
                   seed=1234, width=64, height=64, steps=4, cfg_scale=5.0, sampler_name="Euler",
                   denoising_strength=0.75, mask_blur=0, inpaint_full_res=False)
    payload.update(kw)
    alwayson = {} if unit is None else {pl.TITLE: {"args": [unit]}}
    return api.img2img(alwayson_scripts=alwayson, **payload)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same(a, b) -> bool:
    return np.array_equal(pixels(a), pixels(b))


def infotext(result, i: int = 0) -> str:
    return result.info["infotexts"][i]


def assert_applied(result, n: int = 1, extra_images: int = 0) -> None:
    """n images made with SSR applied (``extra_images``: e.g. ControlNet's detected maps after them)."""
    assert len(result.images) == n + extra_images, (len(result.images), result.info)
    for i in range(n):
        text = infotext(result, i)
        assert "SSR error" not in text, text
        assert "SSR-Encoder: True" in text, text


def assert_no_hook_left(srv) -> None:
    after = txt2img(srv.api)
    assert "SSR" not in infotext(after), infotext(after)
    assert same(after.image, srv.plain.image), "a plain generation after SSR differs from the plain one before it"


def subject(image=None, query=QUERY, **extra) -> dict:
    image = pl.reference_image(0) if image is None else image
    d = {"image": image if isinstance(image, str) else pl.encode(image), "query": query}
    d.update(extra)
    return d


def ssr_of_pixels(srv, rgb: Image.Image) -> Image.Image:
    """The SSR image for reference pixels ``rgb`` sent as a plain RGB PNG (cached)."""
    png = pl.encode(rgb.convert("RGB"))
    key = hashlib.sha256(png.encode()).hexdigest()
    if key not in srv.ssr_cache:
        result = txt2img(srv.api, pl.ssr_unit(subject(png)))
        assert_applied(result)
        srv.ssr_cache[key] = result.image
    return srv.ssr_cache[key]


# ------------------------------------------------------------------------------ plain, SSR, scale 0

def test_plain_ssr_and_scale_zero(server):
    ssr_result = txt2img(server.api, pl.ssr_unit(subject()))
    assert_applied(ssr_result)
    assert not same(ssr_result.image, server.plain.image), "SSR did not change the image"
    assert "SSR 1 query: the red thing" in infotext(ssr_result)

    zero = txt2img(server.api, pl.ssr_unit(subject(), scale=0))
    assert "SSR error" not in infotext(zero), infotext(zero)
    assert same(zero.image, server.plain.image), "scale 0 is not the plain image"

    again = txt2img(server.api, pl.ssr_unit(subject()))
    assert same(again.image, ssr_result.image), "the same SSR request gave another image"

    disabled = txt2img(server.api, pl.ssr_unit(subject(), enabled=False))
    assert "SSR" not in infotext(disabled), infotext(disabled)
    assert same(disabled.image, server.plain.image), "enabled=false is not the plain image"
    assert_no_hook_left(server)


# ------------------------------------------------------------------------------ image forms

def _forms():
    """id -> (what is sent, the RGB pixels it stands for)."""
    im = pl.reference_image(0)
    out = {"png": (pl.encode(im), im)}
    for fmt, key, save in (("JPEG", "jpeg", {"quality": 90}), ("WEBP", "webp", {"quality": 80})):
        text = pl.encode(im, fmt, **save)
        out[key] = (text, pl.decoded(text).convert("RGB"))
    cmyk = pl.encode(im.convert("CMYK"), "JPEG", quality=95)
    assert pl.decoded(cmyk).mode == "CMYK"
    out["cmyk-jpeg"] = (cmyk, pl.decoded(cmyk).convert("RGB"))
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, im.width).astype(np.uint8), (im.height, 1))))
    over_white = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    out["rgba-png"] = (pl.encode(rgba), over_white)  # transparency is seen over white
    palette = im.convert("P", palette=Image.ADAPTIVE, colors=32)
    out["palette-png"] = (pl.encode(palette), palette.convert("RGB"))
    grey = im.convert("L")
    grey16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # 16-bit grey, 257 * v -> v
    assert grey16.mode == "I;16"
    text16 = pl.encode(grey16)
    assert pl.decoded(text16).mode in ("I", "I;16")
    out["grey16-png"] = (text16, grey.convert("RGB"))
    out["data-url-png"] = (pl.encode(im, data_url=True), im)
    jpeg_url = pl.encode(im, "JPEG", data_url=True, quality=90)
    out["data-url-jpeg"] = (jpeg_url, pl.decoded(jpeg_url).convert("RGB"))
    wrapped = "\n".join(textwrap.wrap(pl.encode(im), 76)) + "\n"  # as `base64` on the command line writes it
    out["png-base64-wrapped"] = (wrapped, im)
    return out


FORMS = _forms()


@pytest.mark.parametrize("form", list(FORMS))
def test_image_forms(server, form):
    text, rgb = FORMS[form]
    result = txt2img(server.api, pl.ssr_unit(subject(text)))
    assert_applied(result)
    assert not same(result.image, server.plain.image), f"{form}: SSR did not change the image"
    assert same(result.image, ssr_of_pixels(server, rgb)), \
        f"{form}: the image differs from the one made with the same pixels sent as an RGB PNG"
    assert_no_hook_left(server)


# ------------------------------------------------------------------------------ masks, subjects, windows, batches

def test_mask_with_empty_query(server):
    im = pl.reference_image(0)
    text_mode = ssr_of_pixels(server, im)
    results = []
    for mask in (pl.encode(pl.box_mask()), pl.encode(pl.box_mask(), "JPEG", data_url=True, quality=95)):
        result = txt2img(server.api, pl.ssr_unit(subject(im, query="", mask=mask)))
        assert_applied(result)
        assert "SSR 1 mode: mask" in infotext(result) and "SSR 1 query" not in infotext(result), infotext(result)
        assert not same(result.image, server.plain.image), "the masked subject did not change the image"
        assert not same(result.image, text_mode), "mask mode gave the text-mode image"
        results.append(result.image)
    other = txt2img(server.api, pl.ssr_unit(subject(im, query="", mask=pl.encode(pl.box_mask(box=(0, 0, 40, 30))))))
    assert_applied(other)
    assert not same(other.image, results[0]), "another mask gave the same image"
    assert_no_hook_left(server)


def test_several_subjects(server):
    a, b = pl.reference_image(0), pl.reference_image(3)
    one = txt2img(server.api, pl.ssr_unit(subject(a)))
    two = txt2img(server.api, pl.ssr_unit(subject(a), subject(b, query="", mask=pl.encode(pl.box_mask()), weight=0.8)))
    assert_applied(two)
    text = infotext(two)
    for key in ("SSR 1 mode: text", "SSR 2 mode: mask", "SSR 2 weight: 0.8"):
        assert key in text, text
    assert not same(two.image, one.image), "the second subject changed nothing"
    assert not same(two.image, server.plain.image)
    # weight 0 takes a subject out: the same image as without it
    zero = txt2img(server.api, pl.ssr_unit(subject(a), subject(b, query="the blue thing", weight=0)))
    assert_applied(zero)
    assert same(zero.image, one.image), "a subject of weight 0 changed the image"
    assert_no_hook_left(server)


def test_start_end(server):
    full = txt2img(server.api, pl.ssr_unit(subject()), steps=4)
    late = txt2img(server.api, pl.ssr_unit(subject(), start=0.5, end=1.0), steps=4)
    early = txt2img(server.api, pl.ssr_unit(subject(), start=0.0, end=0.5), steps=4)
    plain4 = txt2img(server.api, steps=4)
    for r in (full, late, early):
        assert_applied(r)
    assert "SSR start: 0.5" in infotext(late) and "SSR end: 0.5" in infotext(early)
    images = {"full": full.image, "late": late.image, "early": early.image, "plain": plain4.image}
    names = list(images)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert not same(images[x], images[y]), f"{x} and {y} windows gave the same image"
    # a window that holds no step: said in the infotext, no error, the plain image
    none = txt2img(server.api, pl.ssr_unit(subject(), start=0.99, end=1.0), steps=2)
    text = infotext(none)
    assert "SSR error" not in text and "SSR-Encoder: not applied" in text, text
    assert same(none.image, txt2img(server.api, steps=2).image), "an empty window changed the image"
    assert_no_hook_left(server)


def test_batches(server):
    plain = txt2img(server.api, batch_size=2, n_iter=2)
    result = txt2img(server.api, pl.ssr_unit(subject()), batch_size=2, n_iter=2)
    assert len(plain.images) == 4
    assert_applied(result, 4)
    assert result.info["all_seeds"] == plain.info["all_seeds"] == [1234, 1235, 1236, 1237]
    for i in range(4):
        assert not same(result.images[i], plain.images[i]), f"image {i} of the batch is the plain one"
    again = txt2img(server.api, pl.ssr_unit(subject()), batch_size=2, n_iter=2)
    assert all(same(x, y) for x, y in zip(again.images, result.images)), "the same batch request gave other images"
    assert_no_hook_left(server)


# ------------------------------------------------------------------------------ invalid input

def _bomb() -> str:
    return pl.encode(Image.new("L", (5000, 4000)))  # 20 Mpixel: more than the 4096 x 4096 accepted


def _truncated_png() -> str:
    raw = base64.b64decode(pl.encode(pl.reference_image(0)))
    return base64.b64encode(raw[:120]).decode()


INVALID = {
    # id: (script args, the field the error must name, or None: just an SSR error)
    "scale out of range": ([pl.ssr_unit(subject(), scale=5)], "scale"),
    "scale a string": ([pl.ssr_unit(subject(), scale="0.5")], "scale"),
    "start after end": ([pl.ssr_unit(subject(), start=0.8, end=0.2)], "end"),
    "enabled a string": ([dict(pl.ssr_unit(subject()), enabled="yes")], "enabled"),
    "unknown model": ([pl.ssr_unit(subject(), model="missing.safetensors")], "model"),
    "unknown clip model": ([pl.ssr_unit(subject(), clip_model="clip_vision/missing")], "clip_model"),
    "misspelt key": ([dict(pl.ssr_unit(subject()), scael=0.5)], "args[0]"),
    "no subjects": ([pl.ssr_unit()], "subjects"),
    "subjects not a list": ([dict(pl.ssr_unit(), subjects=subject())], "subjects"),
    "nine subjects": ([pl.ssr_unit(*[subject()] * 9)], "subjects"),
    "subject without image": ([pl.ssr_unit({"query": QUERY})], "subjects[0].image"),
    "misspelt subject key": ([pl.ssr_unit(subject(wieght=1.0))], "subjects[0]"),
    "server path": ([pl.ssr_unit(subject("/etc/passwd"))], "subjects[0].image"),
    "url": ([pl.ssr_unit(subject("http://127.0.0.1:9/cat.png"))], "subjects[0].image"),
    "not base64": ([pl.ssr_unit(subject("this is not base64!"))], "subjects[0].image"),
    "base64 of text": ([pl.ssr_unit(subject(base64.b64encode(b"just some text, no image").decode()))],
                       "subjects[0].image"),
    "truncated png": ([pl.ssr_unit(subject(_truncated_png()))], "subjects[0].image"),
    "too many pixels": ([pl.ssr_unit(subject(_bomb()))], "subjects[0].image"),
    "no query and no mask": ([pl.ssr_unit(subject(query=""))], "subjects[0].query"),
    "query too long": ([pl.ssr_unit(subject(query="x" * 1001))], "subjects[0].query"),
    "empty mask": ([pl.ssr_unit(subject(mask=pl.encode(Image.new("L", (96, 72)))))], "subjects[0].mask"),
    "mask of another shape": ([pl.ssr_unit(subject(mask=pl.encode(pl.box_mask(40, 80, (0, 0, 20, 20)))))],
                              "subjects[0].mask"),
    "weight negative": ([pl.ssr_unit(subject(weight=-1))], "subjects[0].weight"),
    "mask weight too large": ([pl.ssr_unit(subject(query="", mask=pl.encode(pl.box_mask()), mask_weight=100))],
                              "subjects[0].mask_weight"),
    # the UI's positional list: errors name the UI's controls
    "positional: no query": ([True, 0.65, 0.0, 1.0, None, None, pl.encode(pl.reference_image(0)), "", 1.0, 5.0],
                             "Subject 1 query"),
    "positional: scale": ([True, 9.0, 0.0, 1.0, None, None, pl.encode(pl.reference_image(0)), QUERY, 1.0, 5.0],
                          "Subject scale"),
    # weights for a UNet of another width than the loaded checkpoint's
    "weights for another unet": ([pl.ssr_unit(subject(), model=pl.FULL_SSR)], None),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input(server, case):
    args, field = INVALID[case]
    result = txt2img(server.api, args)
    text = infotext(result)
    assert "SSR error: " in text, f"{case}: no SSR error in {text!r}"
    assert "SSR-Encoder: True" not in text and "SSR scale" not in text, text
    if field is not None:
        assert re.search(r'SSR error: "?' + re.escape(field) + ":", text), f"{case}: the error does not name {field}: {text}"
    assert not re.search(r"(?<![\w.])/(?:tmp|work|root|home)/", text), f"{case}: a server path in the infotext: {text}"
    assert same(result.image, server.plain.image), f"{case}: the image is not the plain one"


# ------------------------------------------------------------------------------ img2img and inpainting

def _img2img_chain(srv, **kw):
    """plain, plain (the baseline: img2img's VAE encoding draws from the random state the
    previous generation left), SSR, plain again."""
    img2img(srv.api, **kw)
    before = img2img(srv.api, **kw)
    ssr_result = img2img(srv.api, pl.ssr_unit(subject()), **kw)
    after = img2img(srv.api, **kw)
    assert "SSR" not in infotext(before) and "SSR" not in infotext(after)
    assert_applied(ssr_result)
    assert same(after.image, before.image), "a plain img2img after SSR differs from the one before"
    assert not same(ssr_result.image, before.image), "SSR did not change the img2img image"
    return before, ssr_result


def test_img2img(server):
    _img2img_chain(server)
    assert_no_hook_left(server)


def test_inpainting(server):
    mask = pl.box_mask(64, 64, (16, 16, 48, 48))
    before, ssr_result = _img2img_chain(server, mask_image=mask, inpainting_fill=1)
    a, b = pixels(before.image), pixels(ssr_result.image)
    inside = np.asarray(mask) > 0
    assert not np.array_equal(a[inside], b[inside]), "SSR did not change the masked area"
    assert np.array_equal(a[~inside], b[~inside]), "SSR changed pixels outside the inpainting mask"
    assert_no_hook_left(server)


# ------------------------------------------------------------------------------ /ssr/* routes

def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_routes(server):
    import ssr

    r = requests.get(server.url + "/ssr/version", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"extension": "SSR-Encoder", "version": ssr.__version__, "api": 1}, r.json()

    r = requests.get(server.url + "/ssr/models", timeout=60)
    assert r.status_code == 200, r.text
    models = r.json()
    ssr_names = [m["name"] for m in models["ssr_models"]]
    for name in (pl.TINY_SSR, pl.FULL_SSR, pl.OFFICIAL_PAIR, pl.REEXPORT_PAIR):
        assert name in ssr_names, (name, ssr_names)
    assert pl.CLIP in [m["name"] for m in models["clip_models"]], models["clip_models"]
    roots = {server.data_dir, os.path.realpath(server.data_dir), INFO["cache"], INFO["webui"], INFO["models"]}
    for s in _strings(models):
        assert not s.startswith("/") and not any(root in s for root in roots), f"a server path in /ssr/models: {s!r}"
    # each listed name is accepted by a generation
    for name in (pl.OFFICIAL_PAIR, pl.REEXPORT_PAIR):
        result = txt2img(server.api, pl.ssr_unit(subject(), model=name))
        assert_applied(result)
        assert f"SSR model: {name}" in infotext(result), infotext(result)

    maps = {}
    image = pl.encode(pl.reference_image(0))
    for mode, body in (("text", {"image": image, "query": QUERY, "model": pl.TINY_SSR}),
                       ("mask", {"image": image, "query": "", "mask": pl.encode(pl.box_mask()), "model": pl.TINY_SSR,
                                 "clip_model": pl.CLIP})):
        r = requests.post(server.url + "/ssr/preview", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["mode"] == mode and out["model"] == pl.TINY_SSR and out["clip_model"] == pl.CLIP, \
            {k: v for k, v in out.items() if k not in ("heatmap", "attention_map")}
        heat = Image.open(io.BytesIO(base64.b64decode(out["heatmap"])))
        assert heat.format == "PNG" and heat.size[0] == heat.size[1] >= 64, (heat.format, heat.size)
        assert np.asarray(heat.convert("RGB")).std() > 0, "the heatmap is one flat colour"
        grid = np.asarray(out["attention_map"], dtype=np.float64)
        assert grid.shape == (out["grid"], out["grid"]) and out["grid"] > 1, grid.shape
        assert grid.min() >= 0.0 and grid.max() <= 1.0 and grid.std() > 0, (grid.min(), grid.max())
        maps[mode] = grid
    assert not np.array_equal(maps["text"], maps["mask"]), "the mask did not change the map"

    for body, field in (({"query": QUERY}, "image"), ({"image": "/etc/passwd", "query": QUERY}, "image"),
                        ({"image": pl.encode(pl.reference_image(0))}, "query"),
                        ({"image": pl.encode(pl.reference_image(0)), "query": QUERY, "colour": 1}, "colour"),
                        ({"image": pl.encode(pl.reference_image(0)), "query": QUERY, "model": "missing.safetensors"},
                         "model")):
        r = requests.post(server.url + "/ssr/preview", json=body, timeout=60)
        assert r.status_code == 422, (body.keys(), r.status_code, r.text)
        assert field in r.json()["detail"], r.text
        assert not any(root in r.text for root in roots), r.text
    assert_no_hook_left(server)


# ------------------------------------------------------------------------------ interrupt

def test_interrupt(server):
    ssr_before = txt2img(server.api, pl.ssr_unit(subject())).image
    done = {}

    def long_run():
        try:
            done["result"] = txt2img(server.api, pl.ssr_unit(subject()), steps=40, width=128, height=128)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            done["error"] = e

    worker = threading.Thread(target=long_run, daemon=True)
    worker.start()
    deadline, state = time.time() + 120, {}
    while time.time() < deadline and worker.is_alive():
        state = requests.get(server.url + "/sdapi/v1/progress?skip_current_image=true", timeout=30).json()["state"]
        if state.get("sampling_step", 0) >= 1 and state.get("sampling_steps") == 40:
            break
        time.sleep(0.1)
    assert worker.is_alive() and 1 <= state.get("sampling_step", 0) < 39, f"the long run was not caught sampling: {state}"
    r = requests.post(server.url + "/sdapi/v1/interrupt", timeout=30)
    assert r.status_code == 200, r.text
    t_interrupt = time.time()
    worker.join(timeout=300)
    assert not worker.is_alive(), "the interrupted generation did not return"
    assert "error" not in done, done.get("error")
    interrupted = done["result"]
    assert "SSR error" not in infotext(interrupted), infotext(interrupted)
    after_state = requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()["state"]
    assert after_state["interrupted"], f"the server did not register the interrupt: {after_state}"
    print(f"\n[http] interrupted at step {state['sampling_step']}/40; returned {time.time() - t_interrupt:.1f} s later")
    assert_no_hook_left(server)
    assert same(txt2img(server.api, pl.ssr_unit(subject())).image, ssr_before), \
        "SSR after an interrupted SSR generation gives another image"


# ------------------------------------------------------------------------------ ControlNet and a checkpoint switch

def _set_checkpoint(srv, name: str) -> None:
    r = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200, f"switching to {name}: HTTP {r.status_code}: {r.text[:500]}"
    current = srv.api.get_options()["sd_model_checkpoint"]
    assert current.startswith(name), f"the checkpoint is {current!r} after asking for {name!r}"


def test_controlnet_unit_with_ssr_and_checkpoint_switch(server):
    ssr_tiny = ssr_of_pixels(server, pl.reference_image(0))
    _set_checkpoint(server, FULL_CKPT)
    try:
        api = server.api
        models = api.controlnet_model_list()
        cn_model = next((m for m in models if m.startswith("control_sd15_random")), None)
        assert cn_model, f"control_sd15_random not in /controlnet/model_list: {models}"
        control = pl.reference_image(11, 64, 64)
        unit = lambda: webuiapi.ControlNetUnit(image=control, module="none", model=cn_model, processor_res=64)  # noqa: E731
        full_ssr = lambda: pl.ssr_unit(subject(), model=pl.FULL_SSR)  # noqa: E731
        small = dict(steps=2)

        plain = txt2img(api, **small)
        assert "Model: full_sd1" in infotext(plain), infotext(plain)
        ssr_only = txt2img(api, full_ssr(), **small)
        cn_only = txt2img(api, controlnet_units=[unit()], **small)
        both = txt2img(api, full_ssr(), controlnet_units=[unit()], **small)
        assert_applied(ssr_only)
        assert_applied(both, extra_images=1)  # ControlNet returns its control map after the image
        assert len(cn_only.images) == 2, len(cn_only.images)
        assert "ControlNet 0" in infotext(cn_only) and "ControlNet 0" in infotext(both), infotext(both)
        assert "SSR" not in infotext(cn_only)
        assert not same(ssr_only.image, plain.image), "SSR changed nothing on the full-size checkpoint"
        assert not same(cn_only.image, plain.image), "the ControlNet unit changed nothing"
        assert not same(both.image, cn_only.image), "SSR changed nothing next to the ControlNet unit"
        assert not same(both.image, ssr_only.image), "the ControlNet unit changed nothing next to SSR"
        assert same(txt2img(api, **small).image, plain.image), "plain after ControlNet + SSR differs from plain before"
        assert same(txt2img(api, full_ssr(), **small).image, ssr_only.image), "SSR alone differs after ControlNet + SSR"
    finally:
        _set_checkpoint(server, TINY_CKPT)
    assert_no_hook_left(server)
    again = txt2img(server.api, pl.ssr_unit(subject()))
    assert_applied(again)
    assert same(again.image, ssr_tiny), "SSR on the tiny checkpoint differs after the switch back"


# ------------------------------------------------------------------------------ --api-auth

def test_api_auth(auth_server):
    url = auth_server.url
    body = {"image": pl.encode(pl.reference_image(0)), "query": QUERY}
    calls = [("GET", "/sdapi/v1/options", None), ("GET", "/sdapi/v1/sd-models", None),
             ("GET", "/ssr/version", None), ("GET", "/ssr/models", None), ("POST", "/ssr/preview", body)]
    for method, route, payload in calls:
        for auth in (None, (AUTH[0], "wrong"), ("someone", AUTH[1])):
            r = requests.request(method, url + route, json=payload, auth=auth, timeout=60)
            assert r.status_code == 401, f"{method} {route} with {auth and auth[0]!r}: HTTP {r.status_code}, not 401: {r.text[:300]}"
        r = requests.request(method, url + route, json=payload, auth=AUTH, timeout=120)
        assert r.status_code == 200, f"{method} {route} with the credentials: HTTP {r.status_code}: {r.text[:300]}"
    r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64}, timeout=60)
    assert r.status_code == 401, r.status_code

    api = auth_server.client(username=AUTH[0], password=AUTH[1])
    plain = txt2img(api)
    result = txt2img(api, pl.ssr_unit(subject()))
    assert_applied(result)
    assert not same(result.image, plain.image)


# ------------------------------------------------------------------------------ install.py

_RUN_INSTALLER = r"""
import json, sys
from modules import errors, launch_utils

ran = []
original_run = launch_utils.run
def recording_run(command, *args, **kwargs):
    out = original_run(command, *args, **kwargs)
    ran.append(command)
    return out
launch_utils.run = recording_run
def fail(message, *args, **kwargs):
    print(message, file=sys.stderr)
    sys.exit(3)
errors.report = fail
launch_utils.run_extension_installer(sys.argv[1])
print("RAN=" + json.dumps(ran))
"""


def test_install_py_changes_no_package(tmp_path):
    data_dir = str(tmp_path / "data")
    build_host.make_data_dir(data_dir, INFO, controlnet=False)
    ext = os.path.join(data_dir, "extensions", build_host.EXTENSION_NAME)
    assert os.path.isfile(os.path.join(ext, "install.py"))
    env = build_host.host_env(INFO, data_dir)

    def freeze():
        r = subprocess.run([INFO["python"], "-m", "pip", "freeze", "--all"], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return sorted(r.stdout.splitlines())

    before = freeze()
    assert any(line.startswith("torch==") for line in before), before[:20]
    r = subprocess.run([INFO["python"], "-c", _RUN_INSTALLER, ext, "--data-dir", data_dir], cwd=INFO["webui"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"run_extension_installer failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    ran = json.loads(r.stdout.split("RAN=")[-1].strip())
    assert len(ran) == 1 and os.path.join(ext, "install.py") in ran[0], f"install.py was not run: {ran}"
    after = freeze()
    changed = sorted(set(before) ^ set(after))
    assert not changed, f"install.py changed installed packages: {changed}"
