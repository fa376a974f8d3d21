"""Stand-in for sd-webui-controlnet v1.1.455 -- only the behaviour that other attention-patching extensions meet.

Mirrors (same names, same mechanics):
  scripts/hook.py
    * mark_prompt_context / unmark_prompt_context: ControlNet wraps p.sample (an INSTANCE attribute; the original is
      kept as p.sample_before_CN_hack) and, before sampling, PREPENDS ONE TOKEN ROW to every conditioning tensor of
      p.c / p.uc / p.hr_c / p.hr_uc, in place inside the prompt_parser containers: a row filled with +1024 for cond,
      -1024 for uncond, so 77 tokens become 78 (154 -> 155). A context is "marked" when mean(| |row0| - 1024 |) < 1e-3.
      Caveat reproduced: p.hr_c / p.hr_uc are usually still None when p.sample is called (they are computed inside
      the hires pass), so the hires pass runs UNMARKED and ControlNet then treats every row as cond (cond_mark = 1).
    * UnetHook.hook: replaces the UNet's `forward` PER INSTANCE (model.forward = forward_webui.__get__(model);
      the previous one -- the bound class method or whatever instance forward was there -- is saved as
      model._original_forward); the new forward strips the mark row, sets model.cond_mark (B, 1, 1, 1) float,
      1 = cond row, 0 = uncond row, runs input/middle/output blocks itself and adds the control residuals
      (stand-in: a float per residual, weight * residual_scale). guidance_schedule_handler is registered with
      on_cfg_denoiser and sets model.current_sampling_percent and guidance_stopped. restore() puts the saved forward
      back and removes the callback (p.sample is not restored: p is discarded after the generation).
  scripts/ipadapter/plugable_ipadapter.py
    * hack_blk / set_model_attn2_replace / clear_all_ip_adapter: each of the 16 attn2 modules gets
      `forward = attn_forward_hacked.__get__(attn2, CrossAttention)` PER INSTANCE; the replaced forward is saved in
      the module-level dict all_hacks and is NEVER CALLED while the hack is on. attn_forward_hacked recomputes text
      attention itself with SDPA using THE MODULE'S OWN self.to_q / self.to_k / self.to_v, adds each IP-Adapter term
      (SDPA of the same q against to_k_ip/to_v_ip of the image embedding, times weight) and returns
      self.to_out(out) -- the to_out Sequential is CALLED (unlike the WebUI's sdp forward, which calls to_out[0] and
      to_out[1]). Forward hooks registered on attn2 (or its to_q/to_k/to_v/to_out) therefore still run;
      a per-instance forward patched onto attn2 before ControlNet is bypassed, and one patched after ControlNet
      hooked is overwritten when clear_all_ip_adapter() restores the saved forwards.
    * ImageEmbed.eval(cond_mark): per row, cond image embedding for cond rows, uncond embedding for uncond rows.
    * Layer numbering: input_blocks 1,2,4,5,7,8 -> 0..5, output_blocks 3..11 -> 6..14, middle -> 15 (keys
      "{2n+1}_to_k_ip"); weights by transformer_index: input 0..5, middle 6, output 7..15.
  scripts/controlnet.py (Script "ControlNet"): process() -> restore previous hooks, clear_all_ip_adapter(), hook the
    IP-Adapter units, then UnetHook.hook; postprocess() -> clear_all_ip_adapter() + restore().

Stand-in deviations: no real ControlNet network (residuals are constants), IP-Adapter projections are tiny random
Linear layers sized from the UNet, the unit's image prompt is given directly as an ImageEmbed (no CLIP-vision run), call_ip's cache also keys on the cond/uncond row pattern (the real one caches per
key for the whole generation and would fail if the batch composition changed), SD1 layouts only.
A unit is a dict like the API's: {"enabled": True, "model": "ip-adapter_sd15" | "control_v11p_sd15_canny",
"weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "image_embeds": ImageEmbed | None,
"effective_region_mask": (1, 1, H, W) tensor | None, "residual_scale": 0.05, "seed": 0}.
"""
import math
from enum import Enum
from typing import NamedTuple

import gradio as gr
import torch
from torch import nn

from modules import devices, scripts
from modules.prompt_parser import ComposableScheduledPromptConditioning, MulticondLearnedConditioning, ScheduledPromptConditioning

POSITIVE_MARK_TOKEN = 1024
NEGATIVE_MARK_TOKEN = - POSITIVE_MARK_TOKEN
MARK_EPS = 1e-3


def prompt_context_is_marked(x):
    t = x[..., 0, :]
    m = torch.abs(t) - POSITIVE_MARK_TOKEN
    m = torch.mean(torch.abs(m)).detach().cpu().float().numpy()
    return float(m) < MARK_EPS


def mark_prompt_context(x, positive):
    if isinstance(x, list):
        for i in range(len(x)):
            x[i] = mark_prompt_context(x[i], positive)
        return x
    if isinstance(x, MulticondLearnedConditioning):
        x.batch = mark_prompt_context(x.batch, positive)
        return x
    if isinstance(x, ComposableScheduledPromptConditioning):
        x.schedules = mark_prompt_context(x.schedules, positive)
        return x
    if isinstance(x, ScheduledPromptConditioning):
        if isinstance(x.cond, dict):
            cond = x.cond['crossattn']
            if prompt_context_is_marked(cond):
                return x
            mark = POSITIVE_MARK_TOKEN if positive else NEGATIVE_MARK_TOKEN
            cond = torch.cat([torch.zeros_like(cond)[:1] + mark, cond], dim=0)
            return ScheduledPromptConditioning(end_at_step=x.end_at_step, cond=dict(crossattn=cond, vector=x.cond['vector']))
        cond = x.cond
        if prompt_context_is_marked(cond):
            return x
        mark = POSITIVE_MARK_TOKEN if positive else NEGATIVE_MARK_TOKEN
        cond = torch.cat([torch.zeros_like(cond)[:1] + mark, cond], dim=0)
        return ScheduledPromptConditioning(end_at_step=x.end_at_step, cond=cond)
    return x


def unmark_prompt_context(x):
    """context (B, 1 + T, C) -> (cond_mark (B, 1, 1, 1), uc_indices, c_indices, context (B, T, C)); an unmarked
    context is returned as is with every row counted as cond."""
    if not prompt_context_is_marked(x):
        mark_batch = torch.ones(size=(x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
        return mark_batch, [], [], x
    mark = x[:, 0, :]
    context = x[:, 1:, :]
    mark = torch.mean(torch.abs(mark - NEGATIVE_MARK_TOKEN), dim=1)
    mark = (mark > MARK_EPS).float()
    mark_batch = mark[:, None, None, None].to(x.dtype).to(x.device)
    mark = mark.detach().cpu().numpy().tolist()
    uc_indices = [i for i, item in enumerate(mark) if item < 0.5]
    c_indices = [i for i, item in enumerate(mark) if not item < 0.5]
    return mark_batch, uc_indices, c_indices, context


class ControlModelType(Enum):
    ControlNet = "ControlNet, Lvmin Zhang"
    IPAdapter = "IPAdapter, Hu Ye"


class ControlParams:
    def __init__(self, control_model, weight, start_guidance_percent, stop_guidance_percent, control_model_type, residual_scale=0.05, effective_region_mask=None):
        self.control_model = control_model
        self.weight = weight
        self.guidance_stopped = False
        self.start_guidance_percent = start_guidance_percent
        self.stop_guidance_percent = stop_guidance_percent
        self.control_model_type = control_model_type
        self.residual_scale = residual_scale
        self.effective_region_mask = effective_region_mask


def aligned_adding(base, x, require_channel_alignment=False):
    if isinstance(x, float):
        if x == 0.0:
            return base
        return base + x
    return base + x


class UnetHook(nn.Module):
    def __init__(self, lowvram=False) -> None:
        super().__init__()
        self.lowvram = lowvram
        self.model = None
        self.sd_ldm = None
        self.control_params = None
        self.current_uc_indices = []
        self.current_c_indices = []
        self.original_forward = None

    def guidance_schedule_handler(self, x):
        for param in self.control_params:
            current_sampling_percent = (x.sampling_step / x.total_sampling_steps)
            param.guidance_stopped = current_sampling_percent < param.start_guidance_percent or current_sampling_percent > param.stop_guidance_percent
            if self.model is not None:
                self.model.current_sampling_percent = current_sampling_percent

    def hook(self, model, sd_ldm, control_params, process):
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
        from ldm.modules.diffusionmodules.util import timestep_embedding

        self.model = model
        self.sd_ldm = sd_ldm
        self.control_params = control_params
        outer = self

        def process_sample(*args, **kwargs):
            mark_prompt_context(kwargs.get('conditioning', []), positive=True)
            mark_prompt_context(kwargs.get('unconditional_conditioning', []), positive=False)
            mark_prompt_context(getattr(process, 'hr_c', []), positive=True)
            mark_prompt_context(getattr(process, 'hr_uc', []), positive=False)
            return process.sample_before_CN_hack(*args, **kwargs)

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            total_controlnet_embedding = [0.0] * 13

            # Handle cond-uncond marker
            cond_mark, outer.current_uc_indices, outer.current_c_indices, context = unmark_prompt_context(context)
            outer.model.cond_mark = cond_mark

            # handle ControlNet (stand-in control model: a constant residual per injection point)
            for param in outer.control_params:
                if param.guidance_stopped or param.control_model_type != ControlModelType.ControlNet:
                    continue
                control = [float(param.weight) * float(param.residual_scale)] * 13
                for idx, item in enumerate(control):
                    total_controlnet_embedding[idx] = item + total_controlnet_embedding[idx]

            # U-Net Encoder
            hs = []
            with torch.no_grad():
                t_emb = devices.cond_cast_unet(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
                emb = self.time_embed(t_emb)
                h = x
                for i, module in enumerate(self.input_blocks):
                    h = module(h, emb, context)
                    hs.append(h)
                h = self.middle_block(h, emb, context)

            # U-Net Middle Block
            h = aligned_adding(h, total_controlnet_embedding.pop())

            # U-Net Decoder
            for i, module in enumerate(self.output_blocks):
                h = torch.cat([h, aligned_adding(hs.pop(), total_controlnet_embedding.pop())], dim=1)
                h = module(h, emb, context)

            # U-Net Output
            h = h.type(x.dtype)
            h = self.out(h)
            return h

        def forward_webui(*args, **kwargs):
            return forward(*args, **kwargs)

        if getattr(process, 'sample_before_CN_hack', None) is None:
            process.sample_before_CN_hack = process.sample
        process.sample = process_sample

        model._original_forward = model.forward
        outer.original_forward = model.forward
        model.forward = forward_webui.__get__(model, UNetModel)

        scripts.script_callbacks.on_cfg_denoiser(self.guidance_schedule_handler)

    def restore(self):
        scripts.script_callbacks.remove_callbacks_for_function(self.guidance_schedule_handler)
        self.control_params = None
        if self.model is not None:
            if hasattr(self.model, "_original_forward"):
                self.model.forward = self.model._original_forward
                del self.model._original_forward


# ---------------------------------------------------------------- IP-Adapter (scripts/ipadapter/plugable_ipadapter.py)

def get_block(model, flag):
    return {
        "input": model.input_blocks,
        "middle": [model.middle_block],
        "output": model.output_blocks,
    }[flag]


def attn_forward_hacked(self, x, context=None, **kwargs):
    batch_size, sequence_length, inner_dim = x.shape
    h = self.heads
    head_dim = inner_dim // h

    if context is None:
        context = x

    q = self.to_q(x)
    k = self.to_k(context)
    v = self.to_v(context)

    del context

    q, k, v = map(lambda t: t.view(batch_size, -1, h, head_dim).transpose(1, 2), (q, k, v))

    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, h * head_dim)

    del k, v

    for f in self.ipadapter_hacks:
        out = out + f(self, x, q)

    del q, x

    return self.to_out(out)


all_hacks = {}
current_model = None


def hack_blk(block, function, type):
    if not hasattr(block, "ipadapter_hacks"):
        block.ipadapter_hacks = []

    if len(block.ipadapter_hacks) == 0:
        all_hacks[block] = block.forward
        block.forward = attn_forward_hacked.__get__(block, type)

    block.ipadapter_hacks.append(function)


class TransformerID(NamedTuple):
    block_type: str
    block_id: int
    block_index: int
    transformer_index: int


def sd1_transformer_ids():
    """(input_ids, output_ids, middle_ids) in ControlNet's StableDiffusionVersion.SD1x.transformer_ids order."""
    input_ids = [TransformerID("input", block_id, 0, i) for i, block_id in enumerate([1, 2, 4, 5, 7, 8])]
    middle_id = TransformerID("middle", 0, 0, 6)
    output_ids = [TransformerID("output", block_id, 0, 7 + i) for i, block_id in enumerate([3, 4, 5, 6, 7, 8, 9, 10, 11])]
    return input_ids, output_ids, [middle_id]


def set_model_attn2_replace(model, target_cls, function, transformer_id: TransformerID):
    block = get_block(model, transformer_id.block_type)
    module = block[transformer_id.block_id][1].transformer_blocks[transformer_id.block_index].attn2
    hack_blk(module, function, target_cls)


def clear_all_ip_adapter():
    global all_hacks, current_model
    for k, v in all_hacks.items():
        k.forward = v
        k.ipadapter_hacks = []
    all_hacks = {}
    current_model = None


class ImageEmbed(NamedTuple):
    """Image embed for a single image: cond_emb, uncond_emb (1 or B, tokens, cross_attention_dim)."""
    cond_emb: torch.Tensor
    uncond_emb: torch.Tensor

    def eval(self, cond_mark: torch.Tensor) -> torch.Tensor:
        assert cond_mark.ndim == 4
        assert self.cond_emb.ndim == self.uncond_emb.ndim == 3
        assert self.uncond_emb.shape[0] == 1 or self.cond_emb.shape[0] == self.uncond_emb.shape[0]
        assert self.cond_emb.shape[0] == 1 or self.cond_emb.shape[0] == cond_mark.shape[0]
        cond_mark = cond_mark[:, :, :, 0].to(self.cond_emb)
        device = cond_mark.device
        dtype = cond_mark.dtype
        return self.cond_emb.to(device=device, dtype=dtype) * cond_mark + self.uncond_emb.to(device=device, dtype=dtype) * (1 - cond_mark)

    @staticmethod
    def average_of(*args):
        conds, unconds = zip(*args)
        return ImageEmbed(torch.sum(torch.stack(conds), dim=0) / len(conds), torch.sum(torch.stack(unconds), dim=0) / len(unconds))


class To_KV(nn.Module):
    def __init__(self, state_dict):
        super().__init__()
        self.to_kvs = nn.ModuleDict()
        for key, value in state_dict.items():
            k = key.replace(".weight", "").replace(".", "_")
            self.to_kvs[k] = nn.Linear(value.shape[1], value.shape[0], bias=False)
            self.to_kvs[k].weight.data = value


class TinyIPAdapterModel(nn.Module):
    """IPAdapterModel with only the attention projections ("ip_adapter" state dict: "{2n+1}.to_k_ip.weight" ...),
    randomly initialised with shapes taken from the UNet's 16 attn2 layers in IP-Adapter numbering."""

    def __init__(self, unet, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        input_ids, output_ids, middle_ids = sd1_transformer_ids()
        state_dict = {}
        for number, tid in enumerate(input_ids + output_ids + middle_ids):
            attn2 = get_block(unet, tid.block_type)[tid.block_id][1].transformer_blocks[tid.block_index].attn2
            for proj in ("to_k_ip", "to_v_ip"):
                out_features, in_features = attn2.to_k.weight.shape
                state_dict[f"{number * 2 + 1}.{proj}.weight"] = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
        self.cross_attention_dim = attn2.to_k.weight.shape[1]
        self.is_sdxl = False
        self.is_pulid = False
        self.ip_layers = To_KV(state_dict)

    def random_image_embed(self, seed=0, num_tokens=4):
        generator = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, num_tokens, self.cross_attention_dim, generator=generator)
        uncond = torch.randn(1, num_tokens, self.cross_attention_dim, generator=generator) * 0.1
        return ImageEmbed(cond, uncond)


class PlugableIPAdapter(nn.Module):
    def __init__(self, ipadapter: TinyIPAdapterModel):
        super().__init__()
        self.ipadapter = ipadapter
        self.disable_memory_management = True
        self.dtype = None
        self.weight = 1.0
        self.cache = None
        self.p_start = 0.0
        self.p_end = 1.0
        self.latent_width = 0
        self.latent_height = 0
        self.effective_region_mask = None
        self.image_emb = None

    def reset(self):
        self.cache = {}

    @torch.no_grad()
    def hook(self, model, preprocessor_outputs, weight, start, end, latent_width, latent_height, effective_region_mask=None, pulid_attn_setting=None, dtype=torch.float32):
        from ldm.modules.attention import CrossAttention

        global current_model
        current_model = model

        self.p_start = start
        self.p_end = end
        self.latent_width = latent_width
        self.latent_height = latent_height
        self.effective_region_mask = effective_region_mask
        self.cache = {}
        self.weight = weight
        self.dtype = dtype
        self.ipadapter.to(torch.device("cpu"), dtype=self.dtype)
        if not isinstance(preprocessor_outputs, (list, tuple)) or isinstance(preprocessor_outputs, ImageEmbed):
            preprocessor_outputs = [preprocessor_outputs]
        self.image_emb = ImageEmbed.average_of(*preprocessor_outputs)

        input_ids, output_ids, middle_ids = sd1_transformer_ids()
        for i, transformer_id in enumerate(input_ids + output_ids + middle_ids):
            set_model_attn2_replace(model, CrossAttention, self.patch_forward(i, transformer_id.transformer_index), transformer_id)

    def weight_on_transformer(self, transformer_index: int) -> float:
        if isinstance(self.weight, dict):
            return self.weight.get(transformer_index, 0.0)
        assert isinstance(self.weight, (float, int))
        return self.weight

    def call_ip(self, key: str, feat, device, rows_pattern=()):
        cache_key = (key, rows_pattern)
        if cache_key not in self.cache:
            self.cache[cache_key] = self.ipadapter.ip_layers.to_kvs[key](feat).to(device)
        return self.cache[cache_key]

    def apply_effective_region_mask(self, out: torch.Tensor) -> torch.Tensor:
        if self.effective_region_mask is None:
            return out
        _, sequence_length, _ = out.shape
        factor = math.sqrt(sequence_length / (self.latent_width * self.latent_height))
        assert factor > 0, f"{factor}, {sequence_length}, {self.latent_width}, {self.latent_height}"
        mask_h = int(self.latent_height * factor)
        mask_w = int(self.latent_width * factor)
        mask = torch.nn.functional.interpolate(self.effective_region_mask.to(out.device), size=(mask_h, mask_w), mode="bilinear").squeeze()
        mask = mask.repeat(len(current_model.cond_mark), 1, 1)
        mask = mask.view(mask.shape[0], -1, 1).repeat(1, 1, out.shape[2])
        return out * mask

    def _attn_eval_ipadapter(self, hidden_states, query, cond_uncond_image_emb, attn_heads, head_dim, emb_to_k, emb_to_v):
        assert hidden_states.ndim == 3
        batch_size, sequence_length, inner_dim = hidden_states.shape
        ip_k = emb_to_k(cond_uncond_image_emb)
        ip_v = emb_to_v(cond_uncond_image_emb)
        ip_k, ip_v = map(lambda t: t.view(batch_size, -1, attn_heads, head_dim).transpose(1, 2), (ip_k, ip_v))
        if query.dtype != ip_k.dtype:
            ip_k = ip_k.to(dtype=query.dtype)
            ip_v = ip_v.to(dtype=query.dtype)
        ip_out = torch.nn.functional.scaled_dot_product_attention(query, ip_k, ip_v, attn_mask=None, dropout_p=0.0, is_causal=False)
        return ip_out.transpose(1, 2).reshape(batch_size, -1, attn_heads * head_dim)

    @torch.no_grad()
    def patch_forward(self, number: int, transformer_index: int):
        @torch.no_grad()
        def forward(attn_blk, x, q):
            batch_size, sequence_length, inner_dim = x.shape
            h = attn_blk.heads
            head_dim = inner_dim // h
            weight = self.weight_on_transformer(transformer_index)

            current_sampling_percent = getattr(current_model, "current_sampling_percent", 0.5)
            if current_sampling_percent < self.p_start or current_sampling_percent > self.p_end or weight == 0.0:
                return 0.0

            k_key = f"{number * 2 + 1}_to_k_ip"
            v_key = f"{number * 2 + 1}_to_v_ip"
            rows_pattern = tuple(current_model.cond_mark.flatten().tolist())
            ip_out = self._attn_eval_ipadapter(
                hidden_states=x,
                query=q,
                cond_uncond_image_emb=self.image_emb.eval(current_model.cond_mark),
                attn_heads=h,
                head_dim=head_dim,
                emb_to_k=lambda emb: self.call_ip(k_key, emb, device=q.device, rows_pattern=rows_pattern),
                emb_to_v=lambda emb: self.call_ip(v_key, emb, device=q.device, rows_pattern=rows_pattern),
            )
            return self.apply_effective_region_mask(ip_out * weight)

        return forward


def is_ip_adapter_unit(unit):
    return "ip-adapter" in str(unit.get("model", "")).lower() or "ip-adapter" in str(unit.get("module", "")).lower()


class ControlNetStandinScript(scripts.Script):
    """The ControlNet extension's AlwaysVisible script: one argument per unit (a dict, as sent through the API)."""

    unit_count = 2

    def __init__(self):
        super().__init__()
        self.latest_network = None
        self.enabled_units = []

    def title(self):
        return "ControlNet"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.State(value=None) for _ in range(self.unit_count)]

    def controlnet_main_entry(self, p, units):
        sd_ldm = p.sd_model
        unet = sd_ldm.model.diffusion_model

        if self.latest_network is not None:
            self.latest_network.restore()  # always restore (~0.05s)
        clear_all_ip_adapter()  # always clear (~0.05s)

        self.enabled_units = [dict(u) for u in units if isinstance(u, dict) and u.get("enabled", True)]
        if len(self.enabled_units) == 0:
            self.latest_network = None
            return

        forward_params = []
        for unit in self.enabled_units:
            if is_ip_adapter_unit(unit):
                ipadapter = TinyIPAdapterModel(unet, seed=int(unit.get("seed", 0)))
                image_embeds = unit.get("image_embeds") or ipadapter.random_image_embed(seed=int(unit.get("seed", 0)))
                param = ControlParams(PlugableIPAdapter(ipadapter), unit.get("weight", 1.0), unit.get("guidance_start", 0.0), unit.get("guidance_end", 1.0),
                                      ControlModelType.IPAdapter, effective_region_mask=unit.get("effective_region_mask"))
                param.hint_cond = image_embeds
            else:
                param = ControlParams(None, unit.get("weight", 1.0), unit.get("guidance_start", 0.0), unit.get("guidance_end", 1.0),
                                      ControlModelType.ControlNet, residual_scale=unit.get("residual_scale", 0.05))
            forward_params.append(param)

        for param in forward_params:
            if param.control_model_type == ControlModelType.IPAdapter:
                param.control_model.hook(model=unet, preprocessor_outputs=param.hint_cond, weight=param.weight, dtype=torch.float32,
                                         start=param.start_guidance_percent, end=param.stop_guidance_percent,
                                         latent_width=p.width // 8, latent_height=p.height // 8, effective_region_mask=param.effective_region_mask)

        self.latest_network = UnetHook()
        self.latest_network.hook(model=unet, sd_ldm=sd_ldm, control_params=forward_params, process=p)

    def process(self, p, *args, **kwargs):
        self.controlnet_main_entry(p, args)

    def postprocess(self, p, processed, *args):
        clear_all_ip_adapter()
        self.enabled_units = []
        if self.latest_network is None:
            return
        self.latest_network.restore()
        self.latest_network = None
