"""Living next to sd-webui-controlnet (its stand-in): a ControlNet unit and an IP-Adapter unit in the same
generation as SSR-Encoder, in both load orders; each extension's cleanup leaves the other's hooks intact."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import ssr
from ssr_webui.session import ROUTE_HOOK_ATTR

from ssr_webui_testenv import TITLE, controlnet_standin, harness, hooks_left, reference_image, script_callbacks, ssr_args, start

GEN = dict(prompt="a cat", negative_prompt="blurry", steps=2, width=64, height=64, seed=5, cfg_scale=5.0)
UNITS = [{"enabled": True, "model": "control_v11p_sd15_canny", "weight": 1.0, "residual_scale": 0.2},
         {"enabled": True, "model": "ip-adapter_sd15", "weight": 0.8, "seed": 1}]


def controlnet_installed(unet):
    return "_original_forward" in unet.__dict__


def ip_adapter_installed(unet):
    return any(getattr(m.forward, "__func__", None) is controlnet_standin.attn_forward_hacked
               for name, m in unet.named_modules() if name.endswith("attn2"))


def generate(env, ssr_on, cn_on, probe=None):
    args = {TITLE: ssr_args((reference_image(1), "a dog", 1.0, 5.0), enabled=ssr_on),
            "ControlNet": list(UNITS) if cn_on else [None, None]}
    if probe:
        script_callbacks.on_cfg_denoiser(probe)
    try:
        processed = harness.txt2img(env.txt2img, script_args_by_title=args, **GEN)
    finally:
        if probe:
            script_callbacks.remove_callbacks_for_function(probe)
    return np.asarray(processed.images[0], dtype=np.int16)


@pytest.mark.parametrize("order", ["after", "before"])
def test_both_effects_applied_in_either_load_order(models_path, sd_model_pristine, order):
    env = start(copy.deepcopy(sd_model_pristine), controlnet=order)
    titles = [s.title() for s in env.txt2img.alwayson_scripts]
    assert titles.index(TITLE) == (0 if order == "after" else 1)
    seen = {}

    def probe(params):
        if params.denoiser.step == 1:  # step 0's UNet calls have run
            session = env.runtime.active
            seen.update(cn=controlnet_installed(env.unet), ip=ip_adapter_installed(env.unet),
                        ssr=ssr.installed_subject_attention(env.unet) is not None,
                        decisions=dict(session.router.decisions))
    only_cn = generate(env, False, True)
    only_ssr = generate(env, True, False)
    both = generate(env, True, True, probe)
    assert seen["cn"] and seen["ip"] and seen["ssr"]
    assert seen["decisions"].get("marker", 0) > 0  # rows told apart by ControlNet's marker token
    assert np.abs(both - only_cn).max() > 0, "SSR had no effect next to ControlNet"
    assert np.abs(both - only_ssr).max() > 0, "ControlNet had no effect next to SSR"
    assert not controlnet_installed(env.unet) and not ip_adapter_installed(env.unet)
    assert hooks_left(env.unet) == 0 and ssr.installed_subject_attention(env.unet) is None
    harness.reset_webui_state()


def test_each_cleanup_leaves_the_other_intact(models_path, sd_model_pristine):
    env = start(copy.deepcopy(sd_model_pristine), controlnet="after")
    controlnet = env.txt2img.script("ControlNet")
    seen = {}

    def ssr_cleans_up_first(params):
        if params.denoiser.step == 1 and "ssr_first" not in seen:
            env.runtime.after_batch(params.denoiser.p)
            seen["ssr_first"] = (controlnet_installed(env.unet), ip_adapter_installed(env.unet),
                                 ssr.installed_subject_attention(env.unet))
    generate(env, True, True, ssr_cleans_up_first)
    assert seen["ssr_first"] == (True, True, None)

    def controlnet_cleans_up_first(params):
        if params.denoiser.step == 1 and "cn_first" not in seen:
            controlnet_standin.clear_all_ip_adapter()
            controlnet.latest_network.restore()
            seen["cn_first"] = (controlnet_installed(env.unet), ip_adapter_installed(env.unet),
                                ssr.installed_subject_attention(env.unet) is not None, hasattr(env.unet, ROUTE_HOOK_ATTR))
    generate(env, True, True, controlnet_cleans_up_first)
    assert seen["cn_first"] == (False, False, True, True)
    assert hooks_left(env.unet) == 0
    harness.reset_webui_state()
