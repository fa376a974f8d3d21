"""Mirrors modules/sd_samplers_common.py: InterruptedException and Sampler.launch_sampling (which turns an
interruption into "return the last predicted x0"), plus the VAE helpers processing uses."""
import torch

from modules import shared
from modules.shared import state


class InterruptedException(BaseException):
    pass


def apply_refiner(cfg_denoiser, sigma=None):
    """No refiner in the stand-in."""
    return False


def store_latent(decoded):
    state.current_latent = decoded


def decode_first_stage(model, x):
    return model.decode_first_stage(x.to(torch.float32))


def images_tensor_to_samples(image, approximation=None, model=None):
    """image (B, 3, H, W) in [-1, 1] -> latent (B, 4, H/8, W/8)."""
    model = model or shared.sd_model
    return model.get_first_stage_encoding(model.encode_first_stage(image))


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.func = funcname
        self.extra_params = []
        self.sampler_noises = None
        self.stop_at = None
        self.eta = None
        self.config = None
        self.last_latent = None
        self.s_min_uncond = None
        self.s_churn = 0.0
        self.s_tmin = 0.0
        self.s_tmax = float('inf')
        self.s_noise = 1.0
        self.eta_option_field = 'eta_ancestral'
        self.eta_infotext_field = 'Eta'
        self.eta_default = 1.0
        self.conditioning_key = getattr(shared.sd_model.model, 'conditioning_key', 'crossattn')
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.options = {}

    def callback_state(self, d):
        step = d['i']
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        state.sampling_step = step
        shared.total_tqdm.update()

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps  # Euler: one model evaluation per step
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def initialize(self, p) -> dict:
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, 'mask') else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, 'nmask') else None
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, 'image_cfg_scale', None)
        self.eta = p.eta if p.eta is not None else getattr(shared.opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, 's_min_uncond', 0.0)
        return {}
