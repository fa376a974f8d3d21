"""The extension's runtime: loaded weights, encoding, and the generation lifecycle.

One ``SSRRuntime`` is created by the script module and owns everything that lives longer
than a generation: the weight caches (small LRUs keyed by file content signature), each
(SSR, CLIP) pair's ``SubjectEmbedder`` with its cache of encoded subjects, and the session
currently sampling. ``release()`` (on script unload) drops all of it.

Failures are made visible, because the WebUI only prints exceptions raised in script
hooks: ``report`` puts the message into the generation's comments (shown under the images
and returned as ``info`` by the API), into the infotext as "SSR error", on the console, and
as a ``gr.Warning`` toast in the UI. Messages name files and folders relative to the search
folders ("ssr_encoder/...", "clip_vision/...", "models/..."), never by absolute server paths
(``scrub_paths``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import ssr
from ssr.cache import LRU
from ssr.attention import check_compatible
from ssr.layers import FAMILY_LABELS, find_cross_attention_layers
from ssr.query_encoder import encode_query_tokens, hf_query_tokens
from ssr.weights import PAIR_NAMES

from . import infotext, patcher, settings
from .model_files import ModelFile, ModelFinder, ModelListing, content_hash
from .request import ArgumentError, SubjectRequest, parse_script_args
from .session import GenerationSession, remove_from_unet, sampling_passes, window_not_applied_reason

SESSION_ATTR = "ssr_encoder_session"  # on the processing object
ERRORS_ATTR = "ssr_encoder_errors"
LOG_PREFIX = "[SSR-Encoder]"


class ModelMismatch(ValueError):
    """The loaded Stable Diffusion model cannot take these SSR weights."""


# ----------------------------------------------------------------------------- the SD model

def check_sd_family(sd_model) -> None:
    if sd_model is None:
        raise ModelMismatch("no Stable Diffusion checkpoint is loaded")
    for flag, label in (("is_sdxl", FAMILY_LABELS["sdxl"]), ("is_sd3", "SD3"), ("is_sd2", FAMILY_LABELS["sd2"])):
        if getattr(sd_model, flag, False):
            raise ModelMismatch(f"the loaded checkpoint is {label}, but SSR-Encoder weights are for SD1.x; "
                                "load an SD1.5-based checkpoint")


def sd_unet(sd_model):
    """The loaded model's ldm-layout UNet module: the WebUI and reForge keep it at
    ``sd_model.model.diffusion_model``, Forge only in its UNet patcher
    (``forge_objects.unet.model.diffusion_model``)."""
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        unet = patcher.patcher_unet(patcher.unet_patcher(sd_model))
    if unet is None:
        raise ModelMismatch("the loaded model has no ldm UNet (sd_model.model.diffusion_model, or "
                            "forge_objects.unet.model.diffusion_model on Forge); this extension supports the "
                            "AUTOMATIC1111 WebUI, Forge and reForge with SD1.x checkpoints")
    return unet


def _text_model(sd_model):
    """-> (HF CLIPTextModel, its tokenizer, a function that loads it the host's way or None):
    the WebUI and reForge wrap it in ``cond_stage_model.wrapped``; Forge keeps it at
    ``forge_objects.clip.cond_stage_model.clip_l.transformer`` with the tokenizer at
    ``forge_objects.clip.tokenizer.clip_l`` and offloads it (its memory manager loads it)."""
    wrapped = getattr(getattr(sd_model, "cond_stage_model", None), "wrapped", None)
    transformer, tokenizer = getattr(wrapped, "transformer", None), getattr(wrapped, "tokenizer", None)
    if transformer is not None and tokenizer is not None:
        return transformer, tokenizer, None
    clip = getattr(getattr(sd_model, "forge_objects", None), "clip", None)
    clip_l = getattr(getattr(clip, "cond_stage_model", None), "clip_l", None)
    transformer = getattr(clip_l, "transformer", None)
    tokenizer = getattr(getattr(clip, "tokenizer", None), "clip_l", None)
    if transformer is None or tokenizer is None:
        return None, None, None
    clip_patcher = getattr(clip, "patcher", None)

    def load():
        if clip_patcher is not None:
            try:
                from backend import memory_management
            except ImportError:  # not Forge's backend
                pass
            else:
                memory_management.load_model_gpu(clip_patcher)
        # Forge's own prompt encoder turns the token and position embeddings to float32 before
        # it encodes (its other layers cast their weights to the input's dtype), so a half
        # checkpoint encodes in float32. Our queries may come first (a preview before any
        # generation): without this they would run in half, which the CPU cannot (LayerNorm).
        # Done in inference mode as the host does it: its weights are inference tensors, and
        # converting them outside that mode breaks the host's next prompt encoding
        # ("Inference tensors do not track version counter").
        embeddings = getattr(getattr(transformer, "text_model", transformer), "embeddings", None)  # transformers 4 / 5
        for name in ("token_embedding", "position_embedding"):
            module = getattr(embeddings, name, None)
            if isinstance(module, torch.nn.Module) and any(p.dtype != torch.float32 for p in module.parameters()):
                with torch.inference_mode():
                    module.to(dtype=torch.float32)

    return transformer, tokenizer, load


def sd_query_encoder(sd_model, text_dim: int) -> Callable[[List[str]], torch.Tensor]:
    """The loaded model's own CLIP text encoder for queries: texts -> [B, 77, text_dim], last
    hidden state after the final LayerNorm (no CLIP-skip, emphasis or embeddings: the HF
    model is called directly, under the WebUI's prompt wrapper)."""
    transformer, tokenizer, load = _text_model(sd_model)
    if transformer is None or tokenizer is None:
        raise ModelMismatch("the loaded model's text encoder is not SD1.x's CLIP text model "
                            "(cond_stage_model.wrapped.transformer / .tokenizer, or Forge's "
                            "forge_objects.clip.cond_stage_model.clip_l)")
    width = getattr(getattr(transformer, "config", None), "hidden_size", None)
    if width is not None and width != text_dim:
        raise ModelMismatch(f"the loaded model's text encoder is {width} wide, the SSR weights expect {text_dim} (SD1.x)")

    def encode(texts: List[str]) -> torch.Tensor:
        device = None
        if load is not None:
            load()
            device = next(transformer.parameters()).device
        elif getattr(sd_model, "lowvram", False):  # --lowvram/--medvram: hooks move it to the GPU when called
            from modules import devices

            device = devices.device
        with torch.no_grad():
            return encode_query_tokens(transformer, hf_query_tokens(tokenizer, list(texts)), device)

    return encode


def _placement_device():
    """-> (device to encode on, whether to move back to the CPU afterwards)."""
    from modules import devices, shared

    placement = settings.clip_placement()
    device = torch.device(devices.device)
    if placement == settings.PLACE_CPU or device.type == "cpu" or getattr(shared.cmd_opts, "lowvram", False):
        return torch.device("cpu"), False
    return device, placement != settings.PLACE_GPU


# ----------------------------------------------------------------------------- paths users may see

def search_roots(runtime) -> List[Tuple[str, str]]:
    """(label, folder) of every folder ``runtime`` searches, then the models folder itself
    ("models"); none when the folders are unknown (outside the WebUI)."""
    roots: List[Tuple[str, str]] = []
    try:
        ssr_folder = runtime.ssr_folder()
        roots.append((os.path.basename(os.path.normpath(ssr_folder)), ssr_folder))
        roots.extend(runtime.clip_folders())
        roots.append(("models", os.path.dirname(os.path.normpath(ssr_folder))))
    except Exception:  # noqa: BLE001 - folders unknown: nothing to replace
        pass
    return roots


def scrub_paths(runtime, text: str) -> str:
    """``text`` as users may see it: every search folder's absolute path replaced by its
    label, so files are named relative to the models folder (``ModelListing.scrub``)."""
    return ModelListing(roots=search_roots(runtime)).scrub(text)


# ----------------------------------------------------------------------------- WebUI state (guarded)

def _webui_state():
    """The WebUI's ``shared.state`` (its ``textinfo`` is the progress text the UI shows), or
    None outside the WebUI."""
    try:
        from modules import shared
    except Exception:  # noqa: BLE001 - not in the WebUI
        return None
    return getattr(shared, "state", None)


def _second_order(sampler_name: Optional[str]) -> bool:
    """Whether the WebUI's sampler calls the model twice a step (its ``second_order`` option)."""
    try:
        from modules import sd_samplers

        config = sd_samplers.find_sampler_config(sampler_name)
        return bool(config is not None and config.options.get("second_order", False))
    except Exception:  # noqa: BLE001 - unknown sampler or not in the WebUI: one call a step
        return False


def _img2img_fix_steps() -> bool:
    try:
        from modules import shared

        return bool(getattr(shared.opts, "img2img_fix_steps", False))
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def announce_loading(what: str):
    """Loading CLIP vision or SSR weights takes seconds the first time: say so on the console
    and in the UI's progress text (restored afterwards), and how long it took."""
    print(f"{LOG_PREFIX} loading {what} (first use; later runs reuse it)", flush=True)
    state = _webui_state()
    previous = getattr(state, "textinfo", None)
    if state is not None:
        try:
            state.textinfo = f"SSR-Encoder: loading {what} (first use)..."
        except Exception:  # noqa: BLE001 - a state object without the attribute
            state = None
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        print(f"{LOG_PREFIX} loading {what} failed after {time.perf_counter() - started:.1f} s", flush=True)
        raise
    else:
        print(f"{LOG_PREFIX} {what} loaded in {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        if state is not None:
            state.textinfo = previous


# ----------------------------------------------------------------------------- the runtime

class SSRRuntime:
    def __init__(self):
        self.finder = ModelFinder()
        self._ssr = LRU(2)
        self._clip = LRU(1, on_evict=self._drop_embedders_of)
        self._embedders = LRU(2)
        self._hashes: Dict[Tuple, str] = {}
        self.lock = threading.RLock()  # loading and encoding: generation vs. preview
        self.active: Optional[GenerationSession] = None

    # ------------------------------------------------------------------ files
    @staticmethod
    def ssr_folder() -> str:
        from modules import paths

        return os.path.join(paths.models_path, "ssr_encoder")

    @staticmethod
    def clip_folders() -> List[Tuple[str, str]]:
        from modules import paths

        folders = [("ssr_encoder", SSRRuntime.ssr_folder()), ("clip_vision", os.path.join(paths.models_path, "clip_vision"))]
        for root in (getattr(paths, "extensions_dir", None), getattr(paths, "extensions_builtin_dir", None)):
            if root and os.path.isdir(root):
                for name in sorted(os.listdir(root)):
                    candidate = os.path.join(root, name, "annotator", "downloads", "clip_vision")
                    if "controlnet" in name.lower() and os.path.isdir(candidate):
                        folders.append(("controlnet", candidate))
        return folders

    def list_models(self) -> ModelListing:
        return self.finder.scan(self.ssr_folder(), self.clip_folders())

    def resolve(self, listing: ModelListing, kind: str, name: Optional[str], field: str) -> ModelFile:
        entries = listing.ssr if kind == "ssr" else listing.clip
        if not entries:
            where = ", ".join(listing.folders.get(kind, []))
            what = f"SSR-Encoder weights (ssr_*.safetensors, or {' + '.join(PAIR_NAMES[0])})" if kind == "ssr" \
                else "CLIP ViT-L/14 vision weights (a Hugging Face folder, model.safetensors, clip_vitl.pth ...)"
            raise ArgumentError(field, f"no {what} found in {where}")
        if name is None:
            return entries[0]
        found = listing.find(kind, name)
        if found is None:
            ignored = listing.why_ignored(name)
            if ignored is not None:
                raise ArgumentError(field, f"{ignored[0]} cannot be used: {ignored[1]}")
            raise ArgumentError(field, f"{name!r} not found; available: {[m.name for m in entries]}")
        return found

    def model_hash(self, model: ModelFile) -> str:
        key = model.signature()
        if key not in self._hashes:
            self._hashes[key] = content_hash(model.files)
        return self._hashes[key]

    # ------------------------------------------------------------------ weights
    def ssr_weights(self, model: ModelFile) -> ssr.SSRWeights:
        key = model.signature()
        weights = self._ssr.get(key)
        if weights is None:
            source = list(model.files) if len(model.files) == 2 else model.path
            with announce_loading(f"SSR weights {model.name}"):
                weights = ssr.load_ssr_weights(source, expect_family=None).eval()
            weights.requires_grad_(False)
            self._ssr.put(key, weights)
        return weights

    def clip_encoder(self, model: ModelFile, width: int) -> ssr.ClipImageEncoder:
        key = (model.signature(), width)
        encoder = self._clip.get(key)
        if encoder is None:
            self._clip.put(key, None)  # evict the previous CLIP before loading another (RAM)
            with announce_loading(f"CLIP vision {model.name}"):
                encoder = ssr.load_clip_image_encoder(model.path, expect_width=width)
            self._clip.put(key, encoder)
        return encoder

    def _drop_embedders_of(self, encoder) -> None:
        if encoder is not None:
            self._embedders.remove_if(lambda e: e.image_encoder is encoder)

    def embedder(self, ssr_file: ModelFile, clip_file: ModelFile) -> ssr.SubjectEmbedder:
        key = (ssr_file.signature(), clip_file.signature())
        found = self._embedders.get(key)
        if found is None:
            weights = self.ssr_weights(ssr_file)
            encoder = self.clip_encoder(clip_file, weights.encoder.config.image_dim)
            found = ssr.SubjectEmbedder(encoder, weights, encode_text=None,
                                        cache_size=int(settings.get(settings.SUBJECT_CACHE)))
            self._embedders.put(key, found)
        return found

    # ------------------------------------------------------------------ encoding
    def check_sd_model(self, sd_model, weights: ssr.SSRWeights):
        """-> the UNet; raises ModelMismatch / IncompatibleUNetError with the reason."""
        check_sd_family(sd_model)
        unet = sd_unet(sd_model)
        check_compatible(find_cross_attention_layers(unet), weights.attention)
        sd_query_encoder(sd_model, weights.encoder.config.text_dim)
        return unet

    @contextlib.contextmanager
    def _encoding(self, embedder: ssr.SubjectEmbedder, sd_model, ssr_file: ModelFile, clip_file: ModelFile):
        """Prepare ``embedder`` to encode with ``sd_model``'s text encoder. CLIP vision and the
        aligner move to the encoding device (Settings) only if something is actually encoded
        (a forward pre-hook on CLIP does it; cached subjects need no move), and go back to the
        CPU afterwards unless the setting keeps them on the GPU. Results are cached by content;
        the cache key holds a fingerprint of the text encoder's output for "", which changes
        with the checkpoint and with LoRAs applied to the text encoder."""
        text_encoder = sd_query_encoder(sd_model, embedder.ssr.encoder.config.text_dim)
        with self.lock:
            fingerprint = hashlib.sha1(text_encoder([""]).float().cpu().numpy().tobytes()).hexdigest()[:16]
            embedder.encode_text = text_encoder
            embedder.model_key = f"{ssr_file.signature()}|{clip_file.signature()}|{fingerprint}"
            device, move_back = _placement_device()
            parts = (embedder.image_encoder, embedder.ssr.encoder)
            moved = []

            def place(module, args):
                if not moved:
                    moved.append(device)
                    for part in parts:
                        part.to(device)

            hook = embedder.image_encoder.register_forward_pre_hook(place)
            try:
                yield embedder
            finally:
                hook.remove()
                if moved and move_back:
                    for part in parts:
                        part.to("cpu")
                    from modules import devices

                    devices.torch_gc()

    def encode(self, embedder: ssr.SubjectEmbedder, subjects: Sequence[ssr.Subject], sd_model,
               ssr_file: ModelFile, clip_file: ModelFile) -> ssr.EncodedSubjects:
        with self._encoding(embedder, sd_model, ssr_file, clip_file):
            return embedder.encode(list(subjects))

    # ------------------------------------------------------------------ reporting
    def report(self, p, message: str, applied: bool = False, exc: Optional[BaseException] = None,
               notice: bool = False, partly: bool = False) -> None:
        """An error (or, with ``notice``, a reason for not applying that is no error: the SSR
        keys stay in the infotext and no "SSR error" is written) reaches the console, the
        generation's comments and infotext, and the UI as a toast; with paths relative to the
        models folder (``scrub_paths``)."""
        message = scrub_paths(self, message)
        text = f"SSR-Encoder {'was only partly applied' if partly else 'stopped' if applied else 'was not applied'}: {message}"
        print(f"{LOG_PREFIX} {text}", file=sys.stderr)
        if exc is not None and not isinstance(exc, (ArgumentError, ModelMismatch, ssr.WeightFileError,
                                                    ssr.IncompatibleUNetError)):
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        if p is None:
            return
        errors = getattr(p, ERRORS_ATTR, None)
        if errors is None:
            errors = []
            setattr(p, ERRORS_ATTR, errors)
        errors.append(text)
        if hasattr(p, "comment"):
            p.comment(text)
        params = p.extra_generation_params
        if not notice:
            if not applied:
                for key in [k for k in params if infotext.is_ssr_key(k)]:
                    del params[key]
            params[infotext.ERROR] = message if len(message) <= 500 else message[:497] + "..."
        if not getattr(p, "is_api", False):
            try:
                import gradio as gr

                gr.Warning(text)
            except Exception:  # noqa: BLE001 - no UI event context (tests, API): the comment carries it
                pass

    # ------------------------------------------------------------------ generation lifecycle
    def clear_stale(self, p) -> None:
        """Remove SSR hooks left by a generation that ended in an exception."""
        if self.active is not None:
            self.active.uninstall()
        try:
            unet = sd_unet(getattr(p, "sd_model", None))
        except ModelMismatch:
            unet = None
        if unet is not None and remove_from_unet(unet):
            print(f"{LOG_PREFIX} removed subject attention left over from an interrupted generation", file=sys.stderr)

    @staticmethod
    def not_applied_reason(p, request) -> Optional[str]:
        """Why an enabled, valid request would change nothing, decided before sampling: every
        subject's weight is 0, or the start/end window holds no step of any sampling pass
        (from ``p.steps``, the hires pass's steps, the sampler and the img2img strength). On a
        host with a UNet patcher (Forge, reForge) the window is in sigmas (the host's
        ``percent_to_sigma``), which step counts cannot predict for every scheduler: there
        ``after_batch`` says so when no UNet call fell in it."""
        if all(s.weight == 0 for s in request.subjects):
            return "every subject's weight is 0"
        if patcher.serves_by_patches(getattr(p, "sd_model", None)):
            return None
        passes = sampling_passes(p, _second_order, _img2img_fix_steps())
        return window_not_applied_reason(request.start, request.end, passes)

    def start_generation(self, p, args: Sequence) -> Optional[GenerationSession]:
        """``Script.process``: validate, load and check everything before anything is applied."""
        self.clear_stale(p)
        setattr(p, SESSION_ATTR, None)
        try:
            request = parse_script_args(args)
            if not request.enabled:
                return None
            with self.lock:
                listing = self.list_models()
                ssr_file = self.resolve(listing, "ssr", request.model, request.field_name("model"))
                clip_file = self.resolve(listing, "clip", request.clip_model, request.field_name("clip_model"))
                reason = self.not_applied_reason(p, request)
                if reason is not None:  # nothing to load or install
                    p.extra_generation_params.update(
                        infotext.generation_params(request, ssr_file.name, None, clip_file.name, not_applied=reason))
                    self.report(p, reason, notice=True)
                    return None
                weights = self.ssr_weights(ssr_file)
                try:
                    self.check_sd_model(p.sd_model, weights)  # before loading CLIP: fail fast
                except (ModelMismatch, ssr.IncompatibleUNetError) as e:  # say which choice does not fit
                    raise type(e)(f"{request.field_name('model')} {ssr_file.name}: {e}") from e
                embedder = self.embedder(ssr_file, clip_file)
                weights = embedder.ssr  # the same file; one object in memory
                model_hash = self.model_hash(ssr_file)
        except Exception as e:  # noqa: BLE001 - every failure must reach the user, not only the console
            self.report(p, str(e) or type(e).__name__, exc=e)
            return None
        session = GenerationSession(self, p, request, ssr_file, clip_file, weights, embedder)
        setattr(p, SESSION_ATTR, session)
        p.extra_generation_params.update(infotext.generation_params(request, ssr_file.name, model_hash, clip_file.name))
        return session

    def before_sampling(self, p) -> None:
        """``Script.process_before_every_sampling`` (each batch, and the hires-fix pass)."""
        session: Optional[GenerationSession] = getattr(p, SESSION_ATTR, None)
        if session is None or session.failed:
            return
        try:
            session.prepare(p.sd_model)
        except Exception as e:  # noqa: BLE001
            session.failed = str(e) or type(e).__name__
            self.report(p, session.failed, applied=session.steps_active > 0, exc=e)

    def after_batch(self, p) -> None:
        """``Script.postprocess_batch``: hooks exist only while sampling."""
        session = getattr(p, SESSION_ATTR, None)
        if session is not None:
            problem = session.served_problem()
            session.uninstall()
            state = _webui_state()
            stopped = state is not None and (getattr(state, "interrupted", False) or getattr(state, "skipped", False))
            if problem is not None and not session.served_reported and not session.failed and not stopped:
                # Armed, but the layers never ran the branch (a host path around our hooks or
                # patches): never claim it was applied.
                session.served_reported = True
                reason, partly = problem
                self.report(p, reason, applied=partly, partly=partly)
            if session.passes and not session.steps_active and not session.failed and not session.idle_reported \
                    and not stopped:
                # The estimate before sampling said some step was in the window, but the sampler
                # made fewer calls than it announced: say so rather than claim it was applied.
                session.idle_reported = True
                reason = (f"start/end window {session.request.start:g}-{session.request.end:g} "
                          "covered none of the sampler's steps")
                p.extra_generation_params[infotext.ENABLED] = infotext.not_applied_value(reason)
                self.report(p, reason, notice=True)

    def finish_generation(self, p, processed) -> None:
        """``Script.postprocess``: remove everything, and make sure errors reach the result."""
        session = getattr(p, SESSION_ATTR, None)
        if session is not None:
            session.close()
            setattr(p, SESSION_ATTR, None)
        comments = getattr(processed, "comments", None)
        for text in getattr(p, ERRORS_ATTR, None) or []:
            if isinstance(comments, str) and text not in comments:
                processed.comments = comments = comments + text + "\n"

    def on_cfg_denoiser(self, params) -> None:
        session = self.active
        if session is None:
            return
        owner = getattr(getattr(params, "denoiser", None), "p", None)
        if owner is not None and owner is not session.p:
            return
        session.on_step(params)

    def on_cfg_after_cfg(self, params) -> None:
        if self.active is not None:
            self.active.end_step()

    def release(self) -> None:
        """Script unload / UI reload: no hooks, no cached weights."""
        if self.active is not None:
            self.active.uninstall()
        self.active = None
        self._embedders.clear()
        self._ssr.clear()
        self._clip.clear()
        self._hashes.clear()

    # ------------------------------------------------------------------ preview
    def preview(self, subject: SubjectRequest, model: Optional[str], clip_model: Optional[str], sd_model):
        """-> (heatmap [g, g], attention [heads, 77, T], ssr file, clip file). Raises with the reason."""
        check_sd_family(sd_model)
        with self.lock:
            listing = self.list_models()
            ssr_file = self.resolve(listing, "ssr", model, "model")
            clip_file = self.resolve(listing, "clip", clip_model, "clip_model")
            embedder = self.embedder(ssr_file, clip_file)
            with self._encoding(embedder, sd_model, ssr_file, clip_file):
                heatmap, attention = embedder.preview(subject.to_subject())
        return heatmap, attention, ssr_file, clip_file

