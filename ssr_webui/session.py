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

from . import patcher
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


def unrouted(batch: int) -> List[None]:
    """Rows of a UNet call that our pre-hook did not route: no row gets the branch (never the
    single-context default of ``SubjectAttention``, which would serve uncond rows too)."""
    return [None] * batch


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
    that skipped ``postprocess``, the hooks go with it.

    Two ways to serve the branch, chosen per pass by what the host offers: module hooks on
    the attn2 layers (the WebUI), or attn2 replace patches on a clone of the host's UNet
    patcher (Forge, reForge: ``patcher.py``). Either way a forward pre-hook on the UNet
    decides each call's rows (the host's ``cond_or_uncond`` marks where it passes them,
    else ``rows.RowRouter``) and counts the calls the branch was armed for; the handle counts
    the layer calls that served it, and ``served_problem`` compares the two."""

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
        self.steps_active = 0  # denoiser steps (or, on patcher hosts, UNet calls) with the branch switched on
        self.idle_reported = False  # "not applied: no step in the window" was reported after sampling
        self.served_reported = False  # "not applied: armed but not served" was reported
        self.mechanism: Optional[str] = None  # "hooks" (module hooks) or "patches" (host UNet patcher)
        self.sigma_window: Optional[Tuple[float, float]] = None  # (sigma at start, sigma at end) on patcher hosts
        self.calls_armed = 0  # UNet calls with the branch on and a context for some row (this batch)
        self.steps_on = 0  # denoiser steps with the branch switched on (this batch; module hooks)
        self.calls_on = 0  # UNet calls our pre-hook saw with the branch switched on (this batch)
        self.patch_busy: List[bool] = []
        self._patched = None  # (sd_model, original patcher, our clone) while installed
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
        host_patcher = patcher.unet_patcher(sd_model)
        mechanism = "patches" if patcher.serves_by_patches(sd_model) else "hooks"
        try:
            if self.handle is None or self.unet is not unet or not self.handle.installed or mechanism != self.mechanism:
                self.uninstall()
                if mechanism == "patches":
                    self.handle = ssr.SubjectAttention.attach(unet, self.weights.attention, self.request.scale)
                else:
                    self.handle = ssr.install_subject_attention(unet, self.weights.attention, self.request.scale)
                self.mechanism = mechanism
                self.patch_busy = [False] * len(self.handle.layers)
                self.unet = unet
                self._route_hook = unet.register_forward_pre_hook(self._route, with_kwargs=True)
                setattr(unet, ROUTE_HOOK_ATTR, self._route_hook)
                self.runtime.active = self
            self.handle.set_context(encoded.tokens, encoded.value_weights)
            self.handle.scale = self.request.scale
            self.handle.enabled = False  # until a step in [start, end) begins
            self.handle.set_rows(unrouted)  # until our pre-hook routes a UNet call
            self.router.end_step()
            if mechanism == "patches":
                to_sigma = patcher.percent_to_sigma(host_patcher)
                if to_sigma is None:
                    raise RuntimeError("the host's UNet patcher has no percent_to_sigma for the start/end window")
                self.sigma_window = (float(to_sigma(self.request.start)), float(to_sigma(self.request.end)))
                self._unpatch()
                original, clone = patcher.install(self, sd_model, self.handle.layers)
                self._patched = (weakref.ref(sd_model), original, clone)
            else:
                self.sigma_window = None
            self.passes += 1
        except Exception:
            self.uninstall()
            raise

    def _unpatch(self) -> None:
        if self._patched is not None:
            model_ref, original, clone = self._patched
            self._patched = None
            model = model_ref()
            if model is not None:
                patcher.restore(model, original, clone)

    def uninstall(self) -> None:
        if self._route_hook is not None:
            self._route_hook.remove()
            if self.unet is not None and getattr(self.unet, ROUTE_HOOK_ATTR, None) is self._route_hook:
                delattr(self.unet, ROUTE_HOOK_ATTR)
            self._route_hook = None
        self._unpatch()
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
        """``on_cfg_denoiser``: the step's conds, and whether the branch is on for this step
        (on patcher hosts the UNet call's sigma decides, in ``_route``)."""
        if self.handle is None:
            return
        self.router.begin_step(params.text_cond, params.text_uncond)
        self.handle.set_rows(unrouted)
        if self.sigma_window is not None:
            return
        fraction = step_fraction(params)
        self.handle.enabled = self.request.start <= fraction < self.request.end
        self.steps_active += int(self.handle.enabled)
        self.steps_on += int(self.handle.enabled)

    def end_step(self) -> None:
        self.router.end_step()

    def in_sigma_window(self, sigmas) -> bool:
        """Whether a UNet call at ``sigmas`` lies in [start, end): sigma(end) < sigma <= sigma(start)."""
        if not isinstance(sigmas, torch.Tensor) or sigmas.numel() == 0:
            return False
        sigma = float(sigmas.detach().float().max())
        high, low = self.sigma_window
        return low < sigma <= high

    def _route(self, module, args, kwargs):
        """Forward pre-hook of the UNet: pick every row's subject context for this call."""
        if self.handle is None:
            return None
        options = kwargs.get("transformer_options")
        options = options if isinstance(options, dict) else {}
        result = None
        try:
            if self.sigma_window is not None:
                self.handle.enabled = self.in_sigma_window(options.get("sigmas"))
                self.steps_active += int(self.handle.enabled)
            if not self.handle.enabled:
                return None  # outside [start, end): the step's rows need no decision
            self.calls_on += 1
            context = kwargs.get("context", args[2] if len(args) > 2 else None)
            x = kwargs.get("x", args[0] if args else None)
            rows = self.router.route(context, options.get("cond_or_uncond"))
            if not rows and isinstance(x, torch.Tensor):
                rows = [None] * x.shape[0]
            self.handle.set_rows(rows)
            if self.handle.active and any(r is not None for r in rows):  # scale 0 or no tokens: nothing to serve
                self.calls_armed += 1
            if self.mechanism == "patches" and options:
                chained = patcher.ensure_chained(self, options, self.handle.layers)
                if chained is not None:
                    kwargs = dict(kwargs)
                    kwargs["transformer_options"] = chained
                    result = (args, kwargs)
        except Exception as e:  # a hook must not break sampling: switch off and say so
            if self.handle is not None:
                self.handle.enabled = False
                self.handle.set_rows(None)
            self.fail(f"row routing failed ({type(e).__name__}: {e}); the subject branch was switched off")
            return None
        return result

    def served_problem(self) -> Optional[Tuple[str, bool]]:
        """After a batch: -> (reason, whether some layers served it) when the branch was on for
        some steps but our UNet pre-hook saw no call, or armed for some UNet call but no attn2
        layer served it, or some layers never did; else None. Resets the counts for the next
        batch."""
        handle, armed, steps_on, calls_on = self.handle, self.calls_armed, self.steps_on, self.calls_on
        self.calls_armed = self.steps_on = self.calls_on = 0
        if handle is None:
            return None
        if steps_on and not calls_on and handle.scale != 0.0:
            handle.reset_counts()
            return (f"the subject branch was on for {steps_on} sampling steps but the UNet it was installed on "
                    "was never called (the host or another extension sampled around it)", False)
        if armed == 0:
            return None
        served, bypassed = list(handle.served), list(handle.bypassed)
        handle.reset_counts()
        idle = [i for i, n in enumerate(served) if n == 0]
        if not idle:
            return None
        if self.mechanism == "patches":
            why = "the host did not call its attn2 replace patches for them"
        elif any(bypassed[i] for i in idle):
            why = ("something called their projections without the attention module's forward "
                   "(another extension's attention patch)")
        else:
            why = "the UNet ran without calling them"
        total = len(served)
        if len(idle) == total:
            return (f"the subject branch was armed for {armed} UNet calls but no cross-attention layer "
                    f"ran it ({why})", False)
        names = " ".join(self.handle.layers[i][0].replace(".transformer_blocks.0.attn2", "") for i in idle)
        return (f"the subject branch ran on only {total - len(idle)} of {total} cross-attention layers "
                f"(not on {names}: {why})", True)

    def fail(self, message: str) -> None:
        self.failed = message
        p = self.p
        if p is not None:
            self.runtime.report(p, message, applied=self.steps_active > 0)
