"""One generation with SSR-Encoder enabled: the hooks that exist while it samples.

Per sampling pass (``process_before_every_sampling``: every batch, and again for the
hires-fix pass) ``prepare`` encodes the subjects with the model loaded *now* (cached), adds
the subject attention to the UNet's attn2 layers and a forward pre-hook on the UNet that
routes each call's rows (``rows.RowRouter``). Module hooks run around whatever ``forward``
is installed, so they survive the WebUI's class-level attention replacements and
sd-webui-controlnet's per-instance UNet and attn2 forwards, and removing them touches
nothing else. ``on_step`` (from ``on_cfg_denoiser``) switches the branch on only for steps
in [start, end). ``uninstall`` runs after every batch (``postprocess_batch``), at the end
(``postprocess``), when the WebUI closes the processing object (``p.close()``, after an
exception too), when it is garbage-collected, and at the start of the next generation
(``SSRRuntime.clear_stale``).
"""
from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import ssr

from .rows import RowRouter

ROUTE_HOOK_ATTR = "_ssr_webui_route_hook"  # on the UNet: our pre-hook's handle, found again after a crash


def remove_from_unet(unet) -> bool:
    """Remove any SSR hooks from ``unet`` (ours or a stale install). -> whether there were any."""
    found = False
    handle = ssr.installed_subject_attention(unet)
    if handle is not None:
        handle.remove()
        found = True
    hook = getattr(unet, ROUTE_HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(unet, ROUTE_HOOK_ATTR)
        found = True
    return found


def step_fraction(params) -> float:
    """How far this sampling pass is, in [0, 1): the denoiser's own count of its calls over the
    calls it expects (``CFGDenoiser.step / total_steps``; each pass, hires fix included, has its
    own denoiser). ``params.sampling_step`` lags one step behind (0, 0, 1, 2, ...: the sampler
    updates it after each step), so it is only the fallback."""
    denoiser = getattr(params, "denoiser", None)
    step, total = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
    if not (isinstance(step, int) and isinstance(total, int) and total > 0):
        step, total = params.sampling_step, params.total_sampling_steps
    return step / total if total else 0.0


def steps_in_window(start: float, end: float, total: int) -> int:
    """How many of a pass's ``total`` denoiser steps the branch is on for: step k (0-based)
    when ``start <= k / total < end``, the test ``on_step`` applies."""
    return sum(1 for k in range(max(0, int(total))) if start <= k / total < end)


def denoiser_total_steps(steps: int, second_order: bool = False, denoising_strength: Optional[float] = None,
                         fix_steps: bool = False) -> int:
    """The denoiser's ``total_steps`` for a sampling pass (the WebUI's own count, which
    ``step_fraction`` divides by): ``steps`` for txt2img; for img2img and the hires pass
    (``denoising_strength`` given) ``int(min(strength, 0.999) * steps) + 1``, or ``steps``
    with the "img2img: do exactly the amount of steps" setting (``fix_steps``); doubled for
    second-order samplers (Heun, DPM2, DPM++ SDE, ...), which call the model twice a step."""
    steps = int(steps)
    if denoising_strength is not None and not fix_steps:
        steps = int(min(float(denoising_strength), 0.999) * steps) + 1
    return steps * (2 if second_order else 1)


def sampling_passes(p, second_order: Callable[[Optional[str]], bool] = lambda name: False,
                    fix_steps: bool = False) -> List[Tuple[str, int, int]]:
    """-> (label, steps as the user set them, denoiser total steps) for each sampling pass
    of the processing object ``p``: the first pass (txt2img or img2img) and, for txt2img with
    hires fix, the hires pass (``hr_second_pass_steps`` or the first pass's steps).
    ``second_order(sampler_name)`` tells whether that sampler calls the model twice a step."""
    steps = int(getattr(p, "steps", 0) or 0)
    sampler = getattr(p, "sampler_name", None)
    img2img = hasattr(p, "init_images")
    strength = getattr(p, "denoising_strength", None)
    passes = [("img2img" if img2img else "first pass", steps,
               denoiser_total_steps(steps, second_order(sampler), strength if img2img else None, fix_steps))]
    if not img2img and getattr(p, "enable_hr", False):
        hr_steps = int(getattr(p, "hr_second_pass_steps", 0) or 0) or steps
        hr_sampler = getattr(p, "hr_sampler_name", None)
        if not hr_sampler or hr_sampler == "Use same sampler":
            hr_sampler = sampler
        passes.append(("hires pass", hr_steps, denoiser_total_steps(
            hr_steps, second_order(hr_sampler), 0.0 if strength is None else strength, fix_steps)))
    return passes


def window_not_applied_reason(start: float, end: float, passes: Sequence[Tuple[str, int, int]]) -> Optional[str]:
    """Why the branch would act on no step at all, or None when some pass has a step in
    [start, end). The reason has no ',' or ':' (it goes into the infotext unquoted)."""
    if any(steps_in_window(start, end, total) for _, _, total in passes):
        return None
    counts = " or ".join(f"{steps}" if i == 0 else f"{steps} ({label})" for i, (label, steps, _) in enumerate(passes))
    return f"start/end window {start:g}-{end:g} covers no sampling step of {counts}"


def uninstall_on_close(p, uninstall: Callable[[], None]) -> None:
    """Make ``p.close()`` (this instance's only) call ``uninstall`` first. The WebUI closes
    every generation's processing object when it ends, by an exception too (``with
    closing(p)`` around txt2img, img2img and the API's generations), while ``p`` itself lives
    on in reference cycles (the exception's traceback holds the sampling frames) until the
    garbage collector runs: without this the subject attention would stay on the UNet until
    then, or until the next generation."""
    close = getattr(p, "close", None)
    if not callable(close):
        return

    def close_and_uninstall(*args, **kwargs):
        try:
            uninstall()
        finally:
            result = close(*args, **kwargs)
        return result

    p.close = close_and_uninstall


class GenerationSession:
    """Holds what one generation needs: the validated request, the chosen files, the loaded
    weights and embedder. ``p`` is held weakly: when the WebUI drops it after an exception
    that skipped ``postprocess``, the hooks go with it."""

    def __init__(self, runtime, p, request, ssr_file, clip_file, weights, embedder):
        self.runtime = runtime
        self._p = weakref.ref(p)
        self.request = request
        self.ssr_file, self.clip_file = ssr_file, clip_file
        self.weights, self.embedder = weights, embedder
        self.subjects = [s.to_subject() for s in request.subjects]
        self.router = RowRouter()
        self.handle: Optional[ssr.SubjectAttention] = None
        self.unet = None
        self._route_hook = None
        self.failed: Optional[str] = None
        self.passes = 0  # sampling passes the branch was installed for
        self.steps_active = 0  # denoiser steps with the branch switched on
        self.idle_reported = False  # "not applied: no step in the window" was reported after sampling
        self._finalizer = weakref.finalize(p, self.uninstall)
        uninstall_on_close(p, self.uninstall)

    @property
    def p(self):
        return self._p()

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, sd_model) -> None:
        """Encode (cached) with ``sd_model``'s text encoder and install on its UNet. Raises on
        failure; nothing stays installed then."""
        unet = self.runtime.check_sd_model(sd_model, self.weights)
        encoded = self.runtime.encode(self.embedder, self.subjects, sd_model, self.ssr_file, self.clip_file)
        try:
            if self.handle is None or self.unet is not unet or not self.handle.installed:
                self.uninstall()
                self.handle = ssr.install_subject_attention(unet, self.weights.attention, self.request.scale)
                self.unet = unet
                self._route_hook = unet.register_forward_pre_hook(self._route, with_kwargs=True)
                setattr(unet, ROUTE_HOOK_ATTR, self._route_hook)
                self.runtime.active = self
            self.handle.set_context(encoded.tokens, encoded.value_weights)
            self.handle.scale = self.request.scale
            self.handle.enabled = False  # until a step in [start, end) begins
            self.router.end_step()
            self.passes += 1
        except Exception:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        if self._route_hook is not None:
            self._route_hook.remove()
            if self.unet is not None and getattr(self.unet, ROUTE_HOOK_ATTR, None) is self._route_hook:
                delattr(self.unet, ROUTE_HOOK_ATTR)
            self._route_hook = None
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.unet = None
        self.router.end_step()
        if self.runtime.active is self:
            self.runtime.active = None

    def close(self) -> None:
        self.uninstall()
        self._finalizer.detach()

    # ------------------------------------------------------------------ per step / per call
    def on_step(self, params) -> None:
        """``on_cfg_denoiser``: the step's conds, and whether the branch is on for this step."""
        if self.handle is None:
            return
        self.router.begin_step(params.text_cond, params.text_uncond)
        fraction = step_fraction(params)
        self.handle.enabled = self.request.start <= fraction < self.request.end
        self.steps_active += int(self.handle.enabled)

    def end_step(self) -> None:
        self.router.end_step()

    def _route(self, module, args, kwargs):
        """Forward pre-hook of the UNet: pick every row's subject context for this call."""
        if self.handle is None or not self.handle.enabled:
            return None  # outside [start, end): the step's rows need no decision
        try:
            context = kwargs.get("context", args[2] if len(args) > 2 else None)
            x = kwargs.get("x", args[0] if args else None)
            rows = self.router.route(context)
            if not rows and isinstance(x, torch.Tensor):
                rows = [None] * x.shape[0]
            self.handle.set_rows(rows)
        except Exception as e:  # a hook must not break sampling: switch off and say so
            if self.handle is not None:
                self.handle.enabled = False
                self.handle.set_rows(None)
            self.fail(f"row routing failed ({type(e).__name__}: {e}); the subject branch was switched off")
        return None

    def fail(self, message: str) -> None:
        self.failed = message
        p = self.p
        if p is not None:
            self.runtime.report(p, message, applied=self.steps_active > 0)
