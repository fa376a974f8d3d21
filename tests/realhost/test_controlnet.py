"""SSR-Encoder next to the real sd-webui-controlnet v1.1.455, in both script load orders.

* A ControlNet unit (``control_sd15_random`` on the full-width SD1 checkpoint) together with
  SSR: ControlNet replaces the UNet's ``forward`` per instance and prepends its marker token
  to every cond/uncond; every attn2 row is checked layer by layer against the direct
  computation (``hostcheck.verify``).
* ControlNet's IP-Adapter (``ip-adapter_clip_sd15`` preprocessor with a random CLIP ViT-H,
  an ``ip-adapter_sd15``-layout model) together with SSR: IP-Adapter replaces each attn2's
  ``forward`` per instance. For every attn2 call the recorder also runs the installed
  forward (IP-Adapter's) on the same input with no module hook, so ``output - that`` is
  exactly what SSR added: ``scale * to_out[0].weight @ branch`` on rows inside the
  start/end window, bit-for-bit zero outside it.
* Each time: the images differ from either extension alone, nothing of either is left on the
  UNet afterwards, and the other extension alone gives the same image before and after.

Load order: the WebUI orders extension scripts by folder name. This session has the
extension in ``conftest.EXTENSION_FOLDER`` (default ``sd-webui-ssr-encoder``: after
``sd-webui-controlnet``). ``test_other_load_order`` runs this file again in a subprocess
(one process cannot start the WebUI twice) with the extension cloned as ``00-ssr-encoder``,
before ControlNet, and asserts that run passed.
"""
from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

import hostcheck
import payloads as pl
from conftest import EXTENSION_FOLDER, MODELS

CONTROLNET_FOLDER = "sd-webui-controlnet"
FOLDER_ENV = "SSR_REALHOST_EXTENSION_FOLDER"
SSR_FIRST_FOLDER = "00-ssr-encoder"
SSR_FIRST = EXTENSION_FOLDER < CONTROLNET_FOLDER  # what the WebUI's folder-name order gives

GEN = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=2, seed=4321)
# The branch acts on denoiser steps k with start <= k / 2 < end: step 0; step 1 is the part of
# the same generation where SSR must change nothing.
START, END = 0.0, 0.5
ACTIVE_STEPS = {0}
SCALE = 0.8


# ------------------------------------------------------------------------------ load order

def test_other_load_order():
    """This file again, in a new process, with the extension's script loaded before
    ControlNet's (runs first, while this process has not started its WebUI yet)."""
    if os.environ.get(FOLDER_ENV):
        pytest.skip(f"this run is the other load order ({FOLDER_ENV}={os.environ[FOLDER_ENV]})")
    env = dict(os.environ, **{FOLDER_ENV: SSR_FIRST_FOLDER})
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", "-rs"]
    run = subprocess.run(cmd, env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         capture_output=True, text=True, timeout=1500)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"the run with the extension before ControlNet failed:\n{tail}"
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1)) if "passed" in summary else 0
    assert passed >= 3 and "failed" not in summary and "error" not in summary, tail


def test_script_order(host):
    """The order the WebUI runs the two always-on scripts in, for every script callback
    both implement, follows the extension folder names."""
    for runner in (host.scripts.scripts_txt2img, host.scripts.scripts_img2img):
        titles = [s.title() for s in runner.alwayson_scripts]
        assert (titles.index(pl.TITLE) < titles.index("ControlNet")) == SSR_FIRST, (EXTENSION_FOLDER, titles)
        for method in ("process", "postprocess_batch", "postprocess"):
            ordered = [s.title() for s in runner.ordered_scripts(method)]
            assert (ordered.index(pl.TITLE) < ordered.index("ControlNet")) == SSR_FIRST, (method, ordered)


# ------------------------------------------------------------------------------ helpers

def _b64_image(result: dict, index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][index]))).convert("RGB"), dtype=np.int16)


def _controlnet_model(host, stem: str) -> str:
    """The model name as ControlNet's own /controlnet/model_list gives it ("name [hash]")."""
    r = host.client.get("/controlnet/model_list")
    assert r.status_code == 200, r.text
    names = [n for n in r.json()["model_list"] if n.split(" [")[0] == stem]
    assert len(names) == 1, r.json()
    return names[0]


def _controlnet(*units) -> dict:
    return {"controlnet": {"args": list(units)}}


def _ssr_subject(seed: int = 0, query: str = "the red thing"):
    image = pl.reference_image(seed)
    return image, {"image": pl.encode(image), "query": query, "weight": 1.0}


def _expectation(host, model: str, subject) -> hostcheck.Expectation:
    import ssr

    image, query = subject
    weights, encoded = hostcheck.subject_reference(host, os.path.join(MODELS, "ssr_encoder", model),
                                                   os.path.join(MODELS, pl.CLIP), [ssr.Subject(image=image, query=query)])
    return hostcheck.Expectation(encoded.tokens, encoded.value_weights, weights, SCALE, ACTIVE_STEPS)


def _generate(host, scripts: dict, recorder=None) -> dict:
    payload = dict(GEN, alwayson_scripts=scripts)
    if recorder is None:
        result = host.txt2img(**payload)
    else:
        with recorder:
            result = host.txt2img(**payload)
    assert "SSR error" not in result["info"], result["info"]
    return result


def _is_class_forward(module) -> bool:
    """The module runs its class's forward (ControlNet restores its patches by assigning the
    saved bound method back, so an instance attribute may remain; it must be the class's)."""
    return getattr(module.forward, "__func__", None) is type(module).forward


def _hook_count(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in unet.modules())


def _assert_nothing_left(host, baseline_hooks: int) -> None:
    import ssr
    from ssr_webui.session import ROUTE_HOOK_ATTR

    unet = host.unet
    assert ssr.installed_subject_attention(unet) is None
    assert not hasattr(unet, ROUTE_HOOK_ATTR)
    assert _hook_count(unet) == baseline_hooks, "module hooks left on the UNet"
    assert "_original_forward" not in unet.__dict__ and _is_class_forward(unet), "ControlNet's UNet forward left"
    for official, layer in hostcheck.attn2_layers(unet):
        assert _is_class_forward(layer), f"attn2 {official}: a replaced forward was left"
        assert not getattr(layer, "ipadapter_hacks", []), f"attn2 {official}: IP-Adapter patches left"
    assert host.script.runtime.active is None


class Probe:
    """Callbacks that note, at every step, what is installed on the UNet (``on_cfg_denoiser``,
    before the step's UNet calls) and how SSR routed the rows so far (``on_cfg_after_cfg``,
    after them)."""

    def __init__(self, host):
        self.host = host
        self.seen: List[dict] = []
        self.decisions: dict = {}

    def before_step(self, params):
        import ssr

        unet = self.host.unet
        self.seen.append({
            "controlnet": "_original_forward" in unet.__dict__,
            "ip_adapter": all(getattr(layer, "ipadapter_hacks", None) for _, layer in hostcheck.attn2_layers(unet)),
            "ssr": ssr.installed_subject_attention(unet) is not None,
        })

    def after_step(self, params):
        session = self.host.script.runtime.active
        if session is not None:
            self.decisions = dict(session.router.decisions)

    @contextmanager
    def installed(self):
        from modules import script_callbacks

        script_callbacks.on_cfg_denoiser(self.before_step)
        script_callbacks.on_cfg_after_cfg(self.after_step)
        try:
            yield self
        finally:
            script_callbacks.remove_callbacks_for_function(self.before_step)
            script_callbacks.remove_callbacks_for_function(self.after_step)


# ------------------------------------------------------------------------------ ControlNet

def test_controlnet_unit_with_ssr(full_host):
    host = full_host
    baseline = _hook_count(host.unet)
    hint = pl.reference_image(7, 64, 64)
    unit = {"enabled": True, "module": "none", "model": _controlnet_model(host, "control_sd15_random"),
            "image": pl.encode(hint), "weight": 1.0}
    subject_pil, subject = _ssr_subject()
    ssr_args = pl.ssr_unit(subject, scale=SCALE, start=START, end=END, model=pl.FULL_SSR)

    cn_before = _generate(host, _controlnet(unit))
    assert len(cn_before["images"]) >= 1
    ssr_only = _generate(host, pl.alwayson(ssr_args))
    probe = Probe(host)
    recorder = hostcheck.AttentionRecorder(host.unet)
    with probe.installed():
        both = _generate(host, pl.alwayson(ssr_args, **_controlnet(unit)), recorder)
    _assert_nothing_left(host, baseline)
    cn_after = _generate(host, _controlnet(unit))

    # both were installed while sampling; SSR told the rows apart by ControlNet's marker token
    assert probe.seen and all(s["controlnet"] and s["ssr"] for s in probe.seen), probe.seen
    assert probe.decisions.get("marker", 0) > 0 and set(probe.decisions) == {"marker"}, probe.decisions
    assert "SSR-Encoder" in both["info"] and "ControlNet" in both["info"], both["info"]

    # every attn2 row: subject rows exactly plain + scale * W branch, step 0 bit-identical
    counts = hostcheck.verify(recorder, host.unet, _expectation(host, pl.FULL_SSR, (subject_pil, subject["query"])))
    assert counts["subject"] > 0 and counts["unconditional-subject"] > 0 and counts["plain"] > 0, counts
    assert {c.context.shape[1] for c in recorder.calls} == {77}, "the marker token reached the attention layers"

    img_both, img_cn, img_ssr = _b64_image(both), _b64_image(cn_before), _b64_image(ssr_only)
    assert np.abs(img_both - img_cn).max() > 0, "SSR had no effect next to ControlNet"
    assert np.abs(img_both - img_ssr).max() > 0, "ControlNet had no effect next to SSR"
    assert np.array_equal(_b64_image(cn_after), img_cn), "ControlNet alone changed after a run with SSR"


# ------------------------------------------------------------------------------ IP-Adapter

@dataclass
class IPCall:
    official: int
    step: int
    x: torch.Tensor
    context: torch.Tensor
    out: torch.Tensor        # what the layer returned (installed forward + every hook)
    installed: torch.Tensor  # the installed forward (IP-Adapter's) on the same input, no hooks
    plain: torch.Tensor      # the class forward (the WebUI's attention) on the same input, no hooks
    ip_forward: bool         # IP-Adapter's forward was the installed one


@contextmanager
def _no_module_hooks(module):
    """Run ``module``'s submodules without their hooks (to_q/to_out[0] carry SSR's)."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in module.modules()]
    try:
        for m, _, _ in saved:
            m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for m, hooks, pre_hooks in saved:
            m._forward_hooks, m._forward_pre_hooks = hooks, pre_hooks


class IPRecorder(hostcheck.AttentionRecorder):
    """hostcheck's recorder (per step conds, per attn2 call input/context/output) that also
    evaluates, inside the call, the installed forward and the class forward on the same
    input without any module hook: IP-Adapter's forward reads state that only exists
    during sampling (ControlNet's cond_mark, the sampling percent), so it is evaluated then."""

    def __init__(self, unet):
        super().__init__(unet)
        self.calls: List[IPCall] = []

    def _hook(self, official):
        def hook(module, args, kwargs, output):
            x = args[0]
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            with torch.no_grad(), _no_module_hooks(module):
                installed = module.forward(x, context=context)
                plain = type(module).forward(module, x, context=context)
            cpu = lambda t: t.detach().float().cpu().clone()  # noqa: E731
            self.calls.append(IPCall(official, len(self.steps) - 1, cpu(x), cpu(context), cpu(output), cpu(installed),
                                     cpu(plain), bool(getattr(module, "ipadapter_hacks", None))))
        return hook


def _verify_ip_calls(recorder: IPRecorder, unet, expect: hostcheck.Expectation, ssr_on: bool) -> dict:
    layers = dict(hostcheck.attn2_layers(unet))
    counts = {"subject": 0, "unconditional-subject": 0, "plain": 0}
    assert recorder.calls, "no cross-attention call was recorded"
    for call in recorder.calls:
        where = f"layer {call.official} step {call.step}"
        assert call.ip_forward, f"{where}: IP-Adapter's forward was not installed"
        assert not torch.equal(call.installed, call.plain), f"{where}: IP-Adapter had no effect"
        layer = layers[call.official]
        conds = recorder.steps[call.step]
        for row in range(call.x.shape[0]):
            kind = hostcheck.classify(call.context[row], conds)
            added = call.out[row] - call.installed[row]
            if not ssr_on or call.step not in expect.active_steps:
                assert torch.equal(call.out[row], call.installed[row]), f"{where} row {row} ({kind}): changed where SSR must not act"
                counts["plain"] += 1
                continue
            kv = expect.weights.attention[(call.official - 1) // 2]
            b = hostcheck.branch(layer, call.x[row], kv, expect.tokens[0 if kind == "cond" else 1], expect.value_weights)
            want = expect.scale * (b @ layer.to_out[0].weight.float().t())
            # out and installed are O(1) and their difference loses ~1e-7 of them: atol 1e-5
            torch.testing.assert_close(added, want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{where} row {row} ({kind}): {m}")
            counts["subject" if kind == "cond" else "unconditional-subject"] += 1
    return counts


def test_ip_adapter_with_ssr(tiny_host):
    """IP-Adapter (widths of tiny_sd1: the mechanism is per attn2 layer, the same at any
    width) and SSR in the same generation."""
    host = tiny_host
    baseline = _hook_count(host.unet)
    reference = pl.reference_image(9, 96, 96)
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": _controlnet_model(host, "ip-adapter_sd15_tiny"),
            "image": pl.encode(reference), "weight": 1.0}
    subject_pil, subject = _ssr_subject()
    ssr_args = pl.ssr_unit(subject, scale=SCALE, start=START, end=END, model=pl.TINY_SSR)
    expect = _expectation(host, pl.TINY_SSR, (subject_pil, subject["query"]))

    try:
        alone_rec = IPRecorder(host.unet)
        ip_before = _generate(host, _controlnet(unit), alone_rec)
        _assert_nothing_left(host, baseline)
        ssr_only = _generate(host, pl.alwayson(ssr_args))
        probe, both_rec = Probe(host), IPRecorder(host.unet)
        with probe.installed():
            both = _generate(host, pl.alwayson(ssr_args, **_controlnet(unit)), both_rec)
        _assert_nothing_left(host, baseline)
        ip_after = _generate(host, _controlnet(unit))
        _assert_nothing_left(host, baseline)

        assert probe.seen and all(s["controlnet"] and s["ip_adapter"] and s["ssr"] for s in probe.seen), probe.seen
        assert probe.decisions.get("marker", 0) > 0 and set(probe.decisions) == {"marker"}, probe.decisions

        alone = _verify_ip_calls(alone_rec, host.unet, expect, ssr_on=False)
        assert alone["plain"] > 0, alone
        counts = _verify_ip_calls(both_rec, host.unet, expect, ssr_on=True)
        assert counts["subject"] > 0 and counts["unconditional-subject"] > 0 and counts["plain"] > 0, counts

        img_both, img_ip, img_ssr = _b64_image(both), _b64_image(ip_before), _b64_image(ssr_only)
        assert np.abs(img_both - img_ip).max() > 0, "SSR had no effect next to IP-Adapter"
        assert np.abs(img_both - img_ssr).max() > 0, "IP-Adapter had no effect next to SSR"
        assert np.array_equal(_b64_image(ip_after), img_ip), "IP-Adapter alone changed after a run with SSR"
    finally:
        _release_ip_adapter(host)


def _release_ip_adapter(host) -> None:
    """Free CLIP ViT-H (~2.5 GB in fp32) and ControlNet's model cache; give the attn2 layers
    their class forward back (ControlNet's IP-Adapter cleanup leaves the saved bound method as
    an instance attribute, which would pin today's attention optimisation on this model)."""
    for name, module in list(sys.modules.items()):  # ControlNet's preprocessor module, as the WebUI loaded it
        if name.endswith("preprocessor.legacy.processor") and hasattr(module, "unload_clip"):
            module.unload_clip(config="clip_h")
    for _, layer in hostcheck.attn2_layers(host.unet):
        if "forward" in layer.__dict__ and _is_class_forward(layer):
            del layer.forward
    for runner in (host.scripts.scripts_txt2img, host.scripts.scripts_img2img):
        for script in runner.alwayson_scripts:
            if script.title() == "ControlNet":
                type(script).clear_control_model_cache()
                break
