"""Tests of the WebUI v1.10.1 stand-in (tests/webui_standin): hook order and argument slicing, exception swallowing,
CFG row layouts for each option, tokenizer ids, class-level attention replacement, ControlNet stand-in patches."""
import base64
import io
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "webui_standin"))

import gradio as gr  # noqa: E402
from fastapi.exceptions import HTTPException  # noqa: E402
from PIL import Image  # noqa: E402

import controlnet_standin  # noqa: E402
import harness  # noqa: E402
import launch  # noqa: E402
import sd_model_standin as tiny_sd  # noqa: E402
from modules import errors, script_callbacks, scripts, sd_hijack, shared  # noqa: E402
from modules.api import api  # noqa: E402
from modules.ui_components import InputAccordion  # noqa: E402

SMALL = dict(steps=2, width=64, height=64, seed=1)
LONG_PROMPT = " ".join(["red"] * 80)  # 80 tokens -> 2 chunks -> 154-token context


@pytest.fixture(scope="module")
def model():
    return tiny_sd.make_tiny_sd_model()


@pytest.fixture(autouse=True)
def fresh_webui():
    harness.reset_webui_state()
    yield
    harness.reset_webui_state()


class UnetCalls:
    """Records every UNet call: rows (batch size) and the context it got (after ControlNet, if any, stripped it)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        self.calls.append((args[0].shape[0], context.detach().clone()))

    def rows(self):
        return [rows for rows, _ in self.calls]


def encode(model, prompts):
    with torch.no_grad():
        return model.get_learned_conditioning(prompts)


def make_recorder(log, title="Recorder", fail_in=()):
    class Recorder(scripts.Script):
        def title(self):
            return title

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            log.append(("ui", is_img2img))
            with InputAccordion(False, label=title) as enabled:
                strength = gr.Slider(label="Strength", minimum=0.0, maximum=2.0, step=0.1, value=1.0)
            return [enabled, strength]

        def _hook(name):
            def hook(self, p, *args, **kwargs):
                positional = args
                if name in ("postprocess", "postprocess_image"):
                    positional = args[1:]
                log.append((name, positional, tuple(sorted(kwargs)), p.is_api))
                if name == "process_before_every_sampling":
                    log.append(("pbes_c_is_hr_c", kwargs["c"] is getattr(p, "hr_c", None)))
                if name in fail_in:
                    raise RuntimeError(f"boom in {name}")
            return hook

        setup = _hook("setup")
        before_process = _hook("before_process")
        process = _hook("process")
        before_process_batch = _hook("before_process_batch")
        process_batch = _hook("process_batch")
        process_before_every_sampling = _hook("process_before_every_sampling")
        postprocess_batch = _hook("postprocess_batch")
        postprocess_image = _hook("postprocess_image")
        postprocess = _hook("postprocess")

    Recorder.__name__ = f"Recorder_{title}"
    return Recorder


def test_hook_order_args_slicing_and_hires_pass(model):
    log_a, log_b = [], []
    t2i, _ = harness.start_webui([], [make_recorder(log_a, "First"), make_recorder(log_b, "Second")], sd_model=model)
    first, second = t2i.script("first"), t2i.script("SECOND")
    assert (first.args_from, first.args_to, second.args_from, second.args_to) == (1, 3, 3, 5)
    assert first.api_info.args[1].minimum == 0.0 and first.api_info.args[1].maximum == 2.0 and first.api_info.args[0].value is False
    log_a.clear()
    log_b.clear()

    processed = harness.txt2img(t2i, script_args_by_title={"First": [True, 0.5], "Second": [False]}, prompt="a cat",
                                enable_hr=True, hr_scale=2, batch_size=2, **SMALL)

    names = [entry[0] for entry in log_a if entry[0] != "pbes_c_is_hr_c"]
    assert names == ["setup", "before_process", "process", "before_process_batch", "process_batch",
                     "process_before_every_sampling", "process_before_every_sampling", "postprocess_batch",
                     "postprocess_image", "postprocess_image", "postprocess"]
    assert all(entry[1] == (True, 0.5) for entry in log_a if entry[0] != "pbes_c_is_hr_c")
    assert all(entry[1] == (False, 1.0) for entry in log_b if entry[0] != "pbes_c_is_hr_c")
    assert [entry[1] for entry in log_a if entry[0] == "pbes_c_is_hr_c"] == [False, True]
    assert ("process_before_every_sampling", (True, 0.5), ("c", "noise", "uc", "x"), False) in log_a
    assert ("process_batch", (True, 0.5), ("batch_number", "prompts", "seeds", "subseeds"), False) in log_a
    assert ("postprocess_batch", (True, 0.5), ("batch_number", "images"), False) in log_a
    assert processed.index_of_first_image == 1 and len(processed.images) == 3  # grid first (UI path, batch of 2)
    assert processed.images[1].size == (128, 128)


def test_api_path_copies_args_without_validation_and_rejects_unknown_titles(model):
    log = []
    harness.start_webui([], [make_recorder(log, "Recorder")], sd_model=model)
    # once per tab for the UI, then twice per tab by Api.init_default_script_args (`if script.ui(): for elem in script.ui()`)
    assert [entry[1] for entry in log if entry[0] == "ui"] == [False, True, False, False, True, True]
    log.clear()

    harness.api_txt2img({"prompt": "a cat", **SMALL, "alwayson_scripts": {"recorder": {"args": [{"not": "validated"}]}}})
    setup = next(entry for entry in log if entry[0] == "setup")
    assert setup[1] == ({"not": "validated"}, 1.0) and setup[3] is True  # position 1 keeps the ui() default

    with pytest.raises(HTTPException) as excinfo:
        harness.api_txt2img({"prompt": "a cat", **SMALL, "alwayson_scripts": {"No Such Script": {"args": []}}})
    assert excinfo.value.status_code == 422


def test_exceptions_in_hooks_are_reported_and_generation_goes_on(model, capsys):
    log = []
    harness.start_webui([], [make_recorder(log, "Failing", fail_in=("process", "process_before_every_sampling", "postprocess"))], sd_model=model)
    processed = harness.txt2img(prompt="a cat", **SMALL)
    assert len(processed.images) == 1
    messages = [message for message, exc in errors.reported]
    assert any(m.startswith("Error running process: ") for m in messages)
    assert any(m.startswith("Error running process_before_every_sampling: ") for m in messages)
    assert any(m.startswith("Error running postprocess: ") for m in messages)
    assert "RuntimeError: boom in process" in capsys.readouterr().err


def run_and_record(model, **kwargs):
    harness.start_webui([], [], sd_model=model)
    recorder = UnetCalls(model.model.diffusion_model)
    params = []
    script_callbacks.on_cfg_denoiser(lambda p: params.append(p))
    try:
        processed = harness.txt2img(**{**SMALL, **kwargs})
    finally:
        recorder.handle.remove()
    return recorder, params, processed


def test_default_layout_cond_rows_first_then_uncond_in_one_call(model):
    recorder, params, _ = run_and_record(model, prompt=["a cat", "a dog"], negative_prompt=["blurry", "ugly"], batch_size=2)
    assert recorder.rows() == [4, 4]
    context = recorder.calls[0][1]
    torch.testing.assert_close(context[:2], encode(model, ["a cat", "a dog"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(context[2:], encode(model, ["blurry", "ugly"]), rtol=0, atol=1e-6)
    assert [(p.sampling_step, p.total_sampling_steps) for p in params] == [(0, 2), (0, 2)]
    assert params[0].x.shape[0] == 4 and params[0].text_cond.shape == (2, 77, 32) and params[0].denoiser.p is not None


def test_and_prompts_repeat_cond_rows_per_sub_prompt(model):
    recorder, params, _ = run_and_record(model, prompt=["a cat AND a dog", "a bird"], negative_prompt="", batch_size=2)
    assert recorder.rows() == [5, 5]  # 2 + 1 cond rows, then 2 uncond rows
    torch.testing.assert_close(recorder.calls[0][1][:3], encode(model, ["a cat", "a dog", "a bird"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(recorder.calls[0][1][3:], encode(model, ["", ""]), rtol=0, atol=1e-6)


def test_batch_cond_uncond_off_chunks_by_batch_size_and_can_mix(model):
    shared.opts.batch_cond_uncond = False
    recorder, _, _ = run_and_record(model, prompt=["a cat AND a dog", "a bird"], negative_prompt="blurry", batch_size=2, steps=1)
    assert recorder.rows() == [2, 2, 1]
    mixed = recorder.calls[1][1]  # the chunk holding image 1's cond row and image 0's uncond row
    torch.testing.assert_close(mixed[0], encode(model, ["a bird"])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], encode(model, ["blurry"])[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_cond_uncond, expected_rows", [(True, [4, 2]), (False, [2, 2, 2])])
def test_different_token_lengths_run_uncond_separately(model, batch_cond_uncond, expected_rows):
    shared.opts.batch_cond_uncond = batch_cond_uncond
    recorder, _, _ = run_and_record(model, prompt=f"{LONG_PROMPT} AND a cat", negative_prompt="blurry", batch_size=2, steps=1)
    assert recorder.rows() == expected_rows
    assert [context.shape[1] for _, context in recorder.calls] == [154] * (len(expected_rows) - 1) + [77]


def test_pad_cond_uncond_pads_with_the_empty_prompt(model):
    shared.opts.pad_cond_uncond = True
    recorder, _, _ = run_and_record(model, prompt=LONG_PROMPT, negative_prompt="blurry", steps=1)
    assert recorder.rows() == [2]
    uncond = recorder.calls[0][1][1]
    torch.testing.assert_close(uncond[77:], model.cond_stage_model_empty_prompt[0], rtol=0, atol=1e-6)


def test_s_min_uncond_skips_uncond_on_odd_steps(model):
    recorder, _, processed = run_and_record(model, prompt="a cat", batch_size=2, steps=4, s_min_uncond=100.0)
    assert recorder.rows() == [4, 2, 4, 2]
    assert "NGMS: 100.0" in processed.info


def test_skip_early_cond_skips_uncond_on_early_steps(model):
    shared.opts.skip_early_cond = 0.5
    recorder, _, processed = run_and_record(model, prompt="a cat", steps=4)
    assert recorder.rows() == [1, 1, 1, 2]  # step / total <= 0.5 for steps 0, 1, 2
    assert "Skip Early CFG: 0.5" in processed.info


def test_interrupt_stops_sampling_and_later_batches(model):
    harness.start_webui([], [], sd_model=model)
    recorder = UnetCalls(model.model.diffusion_model)

    def interrupt_after_first_step(params):
        if params.denoiser.step == 1:
            shared.state.interrupt()

    script_callbacks.on_cfg_denoiser(interrupt_after_first_step)
    processed = harness.txt2img(prompt="a cat", n_iter=2, **{**SMALL, "steps": 4})
    recorder.handle.remove()
    assert recorder.rows() == [2, 2]  # step 0 and step 1, then InterruptedException before the UNet; no 2nd batch
    assert len(processed.images) == 1


def test_tokenizer_ids_match_open_clip_and_chunks_are_77_tokens():
    import open_clip.tokenizer
    reference = open_clip.tokenizer.SimpleTokenizer()
    tokenizer = tiny_sd.load_clip_tokenizer()
    for text in ["a photo of a cat", "sks dog, wearing sunglasses!", "Photorealistic portrait 1990s"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407) == (reference.encoder["<start_of_text>"], reference.encoder["<end_of_text>"])


def test_wrapper_chunks_long_prompts_and_emphasis(model):
    wrapper = model.cond_stage_model
    chunks, token_count = wrapper.tokenize_line(LONG_PROMPT)
    assert token_count == 80 and len(chunks) == 2 and all(len(c.tokens) == 77 for c in chunks)
    assert chunks[0].tokens[0] == 49406 and chunks[0].tokens[-1] == 49407 and chunks[1].tokens[6:] == [49407] * 71
    chunks, _ = wrapper.tokenize_line("a (cat:1.5)")
    assert chunks[0].tokens[1:4] == [320, 2368, 49407] and chunks[0].multipliers[1:3] == [1.0, 1.5]
    assert encode(model, ["a cat", LONG_PROMPT]).shape == (2, 154, 32)


def attention_reference(attn, x, context):
    """Straightforward multi-head attention with the module's weights (independent of ldm and the stand-in)."""
    q, k, v = x @ attn.to_q.weight.T, context @ attn.to_k.weight.T, context @ attn.to_v.weight.T
    b, n, inner = q.shape
    h = attn.heads
    q, k, v = (t.reshape(b, -1, h, inner // h).permute(0, 2, 1, 3) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (inner // h) ** 0.5, dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(b, n, inner)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_class_level_optimisation_replaces_and_undoes(model):
    import ldm.modules.attention as ldm_attention
    attn = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2
    x, context = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 77, 32)
    to_out_calls = []
    handle = attn.to_out.register_forward_hook(lambda *a: to_out_calls.append(1))

    assert sd_hijack.apply_optimizations("sdp") == "sdp"
    assert ldm_attention.CrossAttention.forward is sd_hijack.sd_hijack_optimizations.scaled_dot_product_attention_forward
    with torch.no_grad():
        torch.testing.assert_close(attn(x, context=context), attention_reference(attn, x, context), rtol=1e-4, atol=1e-5)
    assert to_out_calls == []  # sdp calls to_out[0] and to_out[1], not the Sequential

    assert sd_hijack.apply_optimizations("InvokeAI") == "InvokeAI"
    with torch.no_grad():
        torch.testing.assert_close(attn(x, context=context), attention_reference(attn, x, context), rtol=1e-4, atol=1e-5)
    assert to_out_calls == [1]

    sd_hijack.undo_optimizations()
    assert ldm_attention.CrossAttention.forward is sd_hijack.hypernetwork.attention_CrossAttention_forward
    sd_hijack.restore_ldm_forward()
    assert ldm_attention.CrossAttention.forward is sd_hijack.ldm_original_CrossAttention_forward
    handle.remove()


def test_controlnet_marks_rows_patches_per_instance_and_restores(model):
    unet = model.model.diffusion_model
    t2i, _ = harness.start_webui([], [controlnet_standin.ControlNetStandinScript], sd_model=model)
    attn2_modules = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    bypassed, hooked = [], []
    sentinel_forward = lambda *a, **k: bypassed.append(1)  # noqa: E731  a per-instance patch installed before ControlNet
    attn2_modules[0].forward = sentinel_forward
    hook_handle = attn2_modules[0].register_forward_hook(lambda m, args, kwargs, out: hooked.append(kwargs["context"].shape[1]), with_kwargs=True)
    recorder = UnetCalls(unet)
    marks = []
    script_callbacks.on_cfg_denoised(lambda p: marks.append(unet.cond_mark.flatten().tolist()))

    unit = {"model": "ip-adapter_sd15", "weight": 0.8}
    harness.txt2img(t2i, script_args_by_title={"ControlNet": [unit, {"model": "control_v11p_sd15_canny"}]},
                    prompt=["a cat AND a dog", "a bird"], batch_size=2, enable_hr=True, hr_scale=2, **SMALL)

    first_pass, hires_pass = recorder.calls[:2], recorder.calls[2:]  # contexts as passed to the UNet, before stripping
    assert [context.shape[1] for _, context in first_pass] == [78, 78]  # marked by process_sample (77 + 1)
    assert torch.all(first_pass[0][1][:3, 0] == 1024) and torch.all(first_pass[0][1][3:, 0] == -1024)
    assert marks[:2] == [[1.0, 1.0, 1.0, 0.0, 0.0]] * 2
    assert [context.shape[1] for _, context in hires_pass] == [77, 77] and marks[2:] == [[1.0] * 5] * 2  # hr conds unmarked
    # the saved forward is never called; a module hook still runs on every call and sees the stripped context
    assert bypassed == [] and hooked == [77, 77, 77, 77]
    assert attn2_modules[0].forward is sentinel_forward  # clear_all_ip_adapter restored the saved per-instance forward
    # ...and left every other attn2 with an instance `forward`: the class forward bound at hook time (a real quirk)
    assert attn2_modules[1].forward.__func__ is type(attn2_modules[1]).forward
    assert unet.forward.__func__ is type(unet).forward and not hasattr(unet, "_original_forward")
    assert all(not hasattr(m, "ipadapter_hacks") or m.ipadapter_hacks == [] for m in attn2_modules)
    assert controlnet_standin.all_hacks == {} and script_callbacks.callback_map["callbacks_cfg_denoiser"] == []
    hook_handle.remove()
    for module in attn2_modules + [unet]:  # give the shared fixture model back without instance forwards
        del module.forward


def test_ip_adapter_forward_uses_module_projections_and_adds_image_term(model):
    unet = model.model.diffusion_model
    attn = unet.input_blocks[1][1].transformer_blocks[0].attn2
    ipadapter = controlnet_standin.TinyIPAdapterModel(unet, seed=3)
    image_embed = ipadapter.random_image_embed(seed=4)
    plugable = controlnet_standin.PlugableIPAdapter(ipadapter)
    plugable.hook(model=unet, preprocessor_outputs=image_embed, weight=0.7, start=0.0, end=1.0, latent_width=8, latent_height=8)
    try:
        unet.cond_mark = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
        x, context = torch.randn(2, 64, attn.to_q.in_features), torch.randn(2, 77, 32)
        with torch.no_grad():
            got = attn(x, context=context)
            text = attention_reference(attn, x, context) - attn.to_out[0].bias
            emb = torch.cat([image_embed.cond_emb, image_embed.uncond_emb])
            k_ip, v_ip = emb @ ipadapter.ip_layers.to_kvs["1_to_k_ip"].weight.T, emb @ ipadapter.ip_layers.to_kvs["1_to_v_ip"].weight.T
            q = x @ attn.to_q.weight.T
            h, d = attn.heads, q.shape[-1] // attn.heads
            split = lambda t: t.reshape(2, -1, h, d).permute(0, 2, 1, 3)  # noqa: E731
            ip = (torch.softmax(split(q) @ split(k_ip).transpose(-1, -2) / d ** 0.5, -1) @ split(v_ip)).permute(0, 2, 1, 3).reshape(2, 64, -1)
            expected = text + 0.7 * ip @ attn.to_out[0].weight.T + attn.to_out[0].bias
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        controlnet_standin.clear_all_ip_adapter()
        del unet.cond_mark
    assert "forward" in vars(attn) and attn.forward.__func__ is type(attn).forward  # restored as a bound instance attr
    del attn.forward


def test_img2img_and_inpaint_go_through_the_same_denoiser(model):
    log = []
    _, i2i = harness.start_webui([], [make_recorder(log, "Recorder")], sd_model=model)
    recorder = UnetCalls(model.model.diffusion_model)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    black_mask = Image.new("L", (64, 64), 0)  # white = repaint; all black = keep everything
    processed = harness.img2img(i2i, init_images=[image], mask=black_mask, denoising_strength=0.5, prompt="a cat", **{**SMALL, "steps": 4})
    recorder.handle.remove()
    assert recorder.rows() == [2, 2, 2]  # int(0.5 * 4) + 1 steps of cond + uncond rows
    assert any(entry[0] == "process_before_every_sampling" for entry in log)

    pixels = torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255 * 2 - 1
    with torch.no_grad():
        kept = model.decode_first_stage(model.get_first_stage_encoding(model.encode_first_stage(pixels)))
    expected = (((kept + 1) / 2).clamp(0, 1) * 255)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.array(processed.images[0]).astype(np.float32), expected, atol=1.0)


def test_processed_infotext_comments_and_extra_generation_params(model):
    class Writer(scripts.Script):
        def title(self):
            return "Writer"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def process(self, p, *args):
            p.extra_generation_params.update({"Plain": "x, y", "Per image": ["a", "b"], "Callable": lambda p, index, **kw: f"i{index}", "Gone": None})
            p.comment("SSR: warning")

    t2i, _ = harness.start_webui([], [Writer], sd_model=model)
    processed = harness.api_txt2img({"prompt": "a cat", "negative_prompt": "blurry", "batch_size": 2, **SMALL})
    assert processed.index_of_first_image == 0 and len(processed.images) == 2  # API: no grid
    assert 'Plain: "x, y", Per image: b, Callable: i1' in processed.infotexts[1] and "Gone" not in processed.infotexts[1]
    assert processed.comments == "SSR: warning\n"
    assert processed.images[0].info["parameters"] == processed.infotexts[0]
    assert processed.infotexts[0].startswith("a cat\nNegative prompt: blurry\nSteps: 2, Sampler: Euler")


def test_options_settings_and_callbacks(model):
    changed = []

    def on_ui_settings():
        shared.opts.add_option("ssr_test_scale", shared.OptionInfo(0.5, "Scale", gr.Slider, {"minimum": 0, "maximum": 1}, section=("ssr", "SSR-Encoder"), onchange=lambda: changed.append(1)))

    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.ui_settings_callback()
    assert shared.opts.ssr_test_scale == 0.5 and shared.opts.data["ssr_test_scale"] == 0.5
    assert shared.opts.set("ssr_test_scale", 0.8) is True and changed == [1] and shared.opts.ssr_test_scale == 0.8
    with pytest.raises(AttributeError):
        shared.opts.no_such_option
    shared.reset_opts()
    assert "ssr_test_scale" not in shared.opts.data_labels


def test_input_accordion_is_a_hidden_checkbox_driving_an_accordion():
    with gr.Blocks():
        with InputAccordion(True, label="SSR-Encoder", elem_id="ssr") as enabled:
            inside = gr.Slider(label="w")
    assert isinstance(enabled, gr.Checkbox) and enabled.value is True and enabled.visible is False
    assert enabled.elem_id == "ssr-checkbox" and enabled.get_block_name() == "checkbox"
    assert enabled.accordion.open is True and enabled.accordion.label == "SSR-Encoder" and enabled.accordion.elem_id == "ssr"
    assert any(inside in getattr(child, "children", [child]) for child in enabled.accordion.children)


def test_decode_base64_to_image_accepts_plain_and_data_urls_and_rejects_garbage():
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), (1, 2, 3)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    assert api.decode_base64_to_image(encoded).size == (5, 3)
    assert api.decode_base64_to_image("data:image/png;base64," + encoded).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(HTTPException) as excinfo:
        api.decode_base64_to_image("not an image")
    assert excinfo.value.status_code == 500 and excinfo.value.detail == "Invalid encoded image"


def test_extension_loading_basedir_preload_models_path_and_launch(tmp_path, monkeypatch, model):
    extension = tmp_path / "extensions" / "sd-webui-ssr"
    (extension / "scripts").mkdir(parents=True)
    (extension / "scripts" / "probe.py").write_text(textwrap.dedent("""
        from modules import scripts, script_callbacks
        BASEDIR = scripts.basedir()
        class Probe(scripts.Script):
            def title(self): return "Probe"
            def show(self, is_img2img): return scripts.AlwaysVisible
        script_callbacks.on_app_started(lambda demo, app: Probe.started.append(demo is None))
        Probe.started = []
        from modules import shared
        events = shared.__dict__.setdefault("probe_events", [])
        script_callbacks.on_model_loaded(lambda sd_model: events.append("model_loaded"))
        script_callbacks.on_script_unloaded(lambda: events.append("unloaded"))
    """))
    (extension / "preload.py").write_text("def preload(parser):\n    parser.add_argument('--ssr-device', default='auto')\n")
    assert harness.apply_preload(str(tmp_path / "extensions"), ["--ssr-device", "cpu"]).ssr_device == "cpu"

    monkeypatch.setattr(harness.scripts.paths, "models_path", str(tmp_path / "models"))
    t2i, _ = harness.start_webui([str(extension)], sd_model=model, nowebui=True)
    probe = t2i.script("probe")
    module = harness.scripts.scripts_data[0].module
    assert module.BASEDIR == str(extension) and scripts.basedir() == scripts.paths.script_path
    assert type(probe).started == [True]
    assert script_callbacks.callback_map["callbacks_app_started"][0].name.startswith("sd-webui-ssr/probe.py/app_started")
    assert shared.sd_model.sd_checkpoint_info.name_for_extra == "tiny-sd15" and len(shared.sd_model.sd_model_hash) == 10

    harness.reload_ui([str(extension)])
    assert shared.__dict__.pop("probe_events") == ["model_loaded", "unloaded", "model_loaded"]
    assert len(script_callbacks.callback_map["callbacks_script_unloaded"]) == 1  # re-registered once by the re-import

    assert launch.is_installed("torch") and not launch.is_installed("surely_not_installed_pkg_xyz")
    launch.run_pip("install some-pkg==1.0", "some-pkg")
    assert launch.launch_utils.run_pip_calls == [("install some-pkg==1.0", "some-pkg")]


def test_model_factories_layouts_and_flags(model):
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = model.model.diffusion_model
    expected = [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1.transformer_blocks.0.attn2"] + \
               [f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(3, 12)]
    assert isinstance(unet, UNetModel) and tiny_sd.attn2_layer_names(unet) == expected
    assert all(isinstance(m, CrossAttention) and m.to_k.in_features == 32 for n, m in unet.named_modules() if n.endswith("attn2"))
    assert (model.is_sd1, model.is_sd2, model.is_sdxl) == (True, False, False)
    assert "text_model.final_layer_norm.weight" in model.cond_stage_model.wrapped.transformer.state_dict()

    sd2, sdxl = tiny_sd.make_tiny_sd2_model(), tiny_sd.make_tiny_sdxl_model()
    assert (sd2.is_sd2, sdxl.is_sdxl) == (True, True)
    assert sd2.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features == 64
    assert len(tiny_sd.attn2_layer_names(sdxl.model.diffusion_model)) == 11
    assert set(encode(sdxl, ["a"])) == {"crossattn", "vector"}
    harness.start_webui([], [], sd_model=sdxl)
    assert len(harness.txt2img(prompt="a cat", **SMALL).images) == 1  # the dict-conditioning path samples
