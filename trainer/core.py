"""The training computation: frozen SD1.x + CLIP vision, trainable SSR weights, one loss.

``SSRTrainingCore`` is a plain ``nn.Module`` used by the Lightning module, the tests and the
benchmark alike. The trainable parts are ``ssr.SSRWeights`` and reach the UNet through
``ssr.install_subject_attention``, the same module and hooks the WebUI extension runs.

One training step (batch of B rows, one subject per row):
    z_q = text_encoder(query), prompt_states = text_encoder(prompt)          [B, 77, D]
    z_1..z_6 = CLIP vision(clip_pixel_values)                                [B, 257, W]
    c_s, out_1..out_6 = SSR encoder(z_q, z_1..z_6)                           [B, 462, D]
    UNet(noisy latents, t, prompt_states) with row r's subject branch using c_s[r]
    loss = MSE(prediction, epsilon) + tau * L_reg
Dropped subjects arrive from the data as CLIP input zeros + "" query: the unconditional
subject embedding CFG uses at inference, so it is trained too.

Single-scale training (stage one of the paper's schedule): the 6-scale module is kept and
every scale is fed z_6 (the last CLIP scale), so stage one trains exactly the tensors that
stage two then starts from with the real scales z_1..z_6.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ssr import ClipImageEncoder, SSRWeights, SubjectEncoderConfig, find_cross_attention_layers, install_subject_attention
from ssr.cache import LRU
from ssr.image_encoder import unconditional_pixels
from ssr.query_encoder import encode_query_tokens

from .losses import REGULARIZERS, regularizer_paper, regularizer_reference
from .sd_loading import StableDiffusionParts


def new_ssr_weights(unet: nn.Module, text_dim: int, image_dim: int, inner_dim: int = 512, heads: int = 8,
                    init_kv_from_text: bool = True) -> SSRWeights:
    """Fresh SSR weights fitting ``unet`` (one K_S/V_S pair per attn2 layer, canonical order).

    ``init_kv_from_text`` copies each layer's text K/V projections into K_S/V_S (c_s lives
    in the text-embedding space, so this starts the branch as "attend to text-like tokens"
    instead of noise); otherwise PyTorch's default Linear init."""
    layers = find_cross_attention_layers(unet)
    weights = SSRWeights(SubjectEncoderConfig(text_dim=text_dim, image_dim=image_dim, inner_dim=inner_dim, heads=heads),
                         [layer.to_q.out_features for _, layer in layers])
    if init_kv_from_text:
        with torch.no_grad():
            for kv, (_, layer) in zip(weights.attention, layers):
                kv.to_k.weight.copy_(layer.to_k.weight)
                kv.to_v.weight.copy_(layer.to_v.weight)
    return weights


class LatentCache:
    """VAE latent distributions (mean, std) of SD views, so the VAE runs once per view.

    Key: the sample's key (its file name / shard key), the view's shape and a fingerprint of
    its pixels (4 random projections, rounded), so a flipped view gets its own entry and a
    changed image is never served stale latents. A fingerprint that rounds differently is
    only a cache miss. Entries are fp16 on CPU in an LRU of ``memory_items``; with
    ``directory`` they are also written there (one small file each, atomic rename, so
    several ranks can share it) under a subfolder per VAE (``vae_id``).
    """

    def __init__(self, vae_id: str, memory_items: int = 50_000, directory: Optional[str] = None):
        self.vae_id = vae_id
        self.directory = os.path.join(directory, vae_id) if directory else None
        self._memory = LRU(memory_items)  # key -> (mean, std) fp16 on CPU
        self._projections: Dict[Tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    def keys(self, sample_keys: Sequence[str], pixel_values: torch.Tensor) -> List[str]:
        """sample_keys B strings, pixel_values [B, 3, H, W] -> B cache keys."""
        shape = tuple(pixel_values.shape[1:])
        proj_key = (shape, pixel_values.device)
        if proj_key not in self._projections:
            g = torch.Generator().manual_seed(0)
            numel = pixel_values[0].numel()
            self._projections[proj_key] = (torch.randn(numel, 4, generator=g) / numel ** 0.5).to(pixel_values.device)
        prints = (pixel_values.flatten(1).float() @ self._projections[proj_key]).mul(1000).round().long().tolist()
        size = "x".join(map(str, shape))
        return [f"{k}|{size}|{','.join(map(str, p))}" for k, p in zip(sample_keys, prints)]

    def _path(self, key: str) -> str:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
        return os.path.join(self.directory, digest[:2], digest[2:] + ".safetensors")

    def get(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        entry = self._memory.get(key)
        if entry is None and self.directory and os.path.isfile(self._path(key)):
            from safetensors.torch import load_file

            try:
                tensors = load_file(self._path(key))
                entry = (tensors["mean"], tensors["std"])
            except Exception:  # noqa: BLE001 - a damaged cache file is only a miss
                entry = None
            if entry is not None:
                self._memory.put(key, entry)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store one view's (mean, std) [4, h, w]; -> the stored (fp16, CPU) pair."""
        entry = (mean.detach().to("cpu", torch.float16), std.detach().to("cpu", torch.float16))
        self._memory.put(key, entry)
        if self.directory:
            from safetensors.torch import save_file

            path = self._path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            save_file({"mean": entry[0].contiguous(), "std": entry[1].contiguous()}, tmp)
            os.replace(tmp, path)
        return entry


def weights_identity(module: nn.Module, label: str) -> str:
    """A short id of a frozen model's weights (its first and last 4 tensors, as float32),
    so caches and precomputed shards are never used with another model."""
    h = hashlib.sha1()
    items = list(module.state_dict().items())
    for name, tensor in items[:4] + items[-4:]:
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return f"{label}-" + h.hexdigest()[:12]


def vae_identity(vae: nn.Module) -> str:
    """A short id of the VAE's weights, so a disk cache is never shared between VAEs."""
    return weights_identity(vae, "vae")


class SSRTrainingCore(nn.Module):
    """Frozen SD UNet/VAE/text encoder and CLIP vision, trainable ``ssr`` (SSRWeights).

    ``regularizer``: "reference" or "paper" (see ``trainer.losses``); ``tau``: its weight;
    ``reg_on_dropped_subjects``: also apply it to rows whose subject was dropped (off: those
    rows train through L_LDM only, see ``trainer.losses``).
    """

    def __init__(self, sd: StableDiffusionParts, image_encoder: ClipImageEncoder, ssr: SSRWeights,
                 regularizer: str = "reference", tau: float = 0.1, latent_cache: Optional[LatentCache] = None,
                 reg_on_dropped_subjects: bool = False):
        super().__init__()
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
        self.unet, self.vae, self.text_encoder = sd.unet, sd.vae, sd.text_encoder
        self.image_encoder = image_encoder
        self.ssr = ssr
        self.tokenize = sd.tokenize
        self.noise_scheduler = sd.noise_scheduler
        self.regularizer, self.tau = regularizer, float(tau)
        self.latent_cache = latent_cache
        self.reg_on_dropped_subjects = reg_on_dropped_subjects
        text_width = self.text_encoder.config.hidden_size
        cfg = ssr.encoder.config
        if cfg.text_dim != text_width:
            raise ValueError(f"SSR weights take {cfg.text_dim}-dim query tokens, the text encoder gives {text_width}")
        if cfg.image_dim != image_encoder.config.width:
            raise ValueError(f"SSR weights take {cfg.image_dim}-dim CLIP features, the CLIP vision tower "
                             f"is {image_encoder.config.width} wide (SSR-Encoder needs CLIP ViT-L/14)")
        if cfg.num_scales != image_encoder.config.num_scales:
            raise ValueError(f"SSR weights have {cfg.num_scales} scales, the CLIP encoder gives {image_encoder.config.num_scales}")
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()
        self.ssr.requires_grad_(True)
        # The same hooks as the extension (checks layer count and widths against the UNet).
        self.attention = install_subject_attention(self.unet, ssr.attention, scale=1.0)

    # ------------------------------------------------------------------ bookkeeping
    def frozen_modules(self) -> List[nn.Module]:
        return [self.unet, self.vae, self.text_encoder, self.image_encoder]

    def train(self, mode: bool = True) -> "SSRTrainingCore":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen parts never switch to training behaviour
        return self

    def set_frozen_dtype(self, dtype: torch.dtype) -> None:
        for module in self.frozen_modules():
            if next(module.parameters()).dtype != dtype:
                module.to(dtype)

    def set_subject_context(self, tokens: Optional[torch.Tensor]) -> None:
        """tokens [B, 462, D]: UNet row r uses tokens[r]; None removes the branch. (While
        autograd records, the hooks project K_S/V_S at every call instead of caching, which
        keeps gradient checkpointing's recomputation identical to the forward pass.)"""
        self.attention.set_context(tokens)
        self.attention.set_rows(None)

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], precomputed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """texts (B strings) -> last hidden states [B, 77, D]; each distinct text encoded once.
        ``precomputed`` [B, 77, D] (from precomputed shards) is used for the rows whose text is
        not "" (a dropped prompt or query is "" and gets the live encoding of "")."""
        device = next(self.text_encoder.parameters()).device
        todo = list(range(len(texts))) if precomputed is None else [i for i, t in enumerate(texts) if t == ""]
        states = None
        if precomputed is not None:
            states = precomputed.to(device, self.text_encoder.dtype).clone()
        if todo:
            wanted = [texts[i] for i in todo]
            unique = list(dict.fromkeys(wanted))
            encoded = encode_query_tokens(self.text_encoder, self.tokenize(unique), device)
            encoded = encoded.index_select(0, torch.tensor([unique.index(t) for t in wanted], device=device))
            if states is None:
                return encoded
            states[todo] = encoded.to(states.dtype)
        return states

    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor, generator: torch.Generator,
                       keys: Optional[Sequence[str]] = None) -> torch.Tensor:
        """pixel_values [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8], sampled
        from the VAE's latent distribution (through the cache when there is one)."""
        cache = self.latent_cache if keys is not None else None
        cache_keys = cache.keys(keys, pixel_values) if cache else None
        entries = [cache.get(k) for k in cache_keys] if cache else [None] * len(pixel_values)
        todo = [i for i, e in enumerate(entries) if e is None]
        if todo:
            dist = self.vae.encode(pixel_values[todo].to(self.vae.dtype)).latent_dist
            for j, i in enumerate(todo):
                # With a cache, a miss uses the stored (fp16) values too: hits and misses agree.
                entries[i] = cache.put(cache_keys[i], dist.mean[j], dist.std[j]) if cache else (dist.mean[j], dist.std[j])
        device = pixel_values.device
        mean = torch.stack([e[0].to(device, torch.float32) for e in entries])
        std = torch.stack([e[1].to(device, torch.float32) for e in entries])
        return self.sample_latents(mean, std, generator)

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The VAE latent distribution's mean, std [B, 4, h, w] (any float dtype) -> scaled
        latents [B, 4, h, w] float32: one draw from ``generator``, times the VAE's scaling."""
        mean, std = mean.float(), std.float()
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.vae.config.scaling_factor

    def subject_tokens(self, z_q: torch.Tensor, clip_pixel_values: torch.Tensor, single_scale: bool = False,
                       logit_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """z_q [B, 77, D], clip_pixel_values [B, 3, S, S] -> (c_s [B, 462, D], out_1..out_6 [B, 77, D]).
        logit_bias [B, 257]: mask queries' aligner bias (ssr.mask_logit_bias), or None."""
        with torch.no_grad():
            states = self.image_encoder(clip_pixel_values)
        if single_scale:
            states = [states[-1]] * len(states)
        dtype = self.ssr.encoder.to_q.weight.dtype
        tokens, _, scales = self.ssr.encoder(z_q.to(dtype), [s.to(dtype) for s in states], return_scales=True,
                                             logit_bias=None if logit_bias is None else logit_bias.to(dtype))
        return tokens, scales

    def regularization(self, tokens: torch.Tensor, scales: Sequence[torch.Tensor], z_q: torch.Tensor,
                       rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L_reg over the batch rows ``rows`` [B] bool (None: all rows)."""
        if self.regularizer == "reference":
            return regularizer_reference(scales, z_q, rows)
        return regularizer_paper(tokens, z_q, rows)

    def _unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        return self.unet(latents.to(dtype), timesteps, encoder_hidden_states=text.to(dtype)).sample

    # ------------------------------------------------------------------ training loss
    def losses(self, batch: Dict, generator: torch.Generator, single_scale: bool = False) -> Dict[str, torch.Tensor]:
        """batch: clip_pixel_values [B,3,C,C], prompt/query (B strings) and either
        pixel_values [B,3,R,R] (raw data; optional key, B strings, for the latent cache) or
        latent_mean, latent_std [B,4,R/8,R/8] (precomputed shards, the VAE not run);
        optional prompt_states, query_states [B,77,D] (precomputed text embeddings) and
        subject_dropped [B] bool (rows left out of L_reg unless reg_on_dropped_subjects).
        All randomness (latent sample, timesteps, noise, in that order) comes from
        ``generator``, on the batch's device.
        -> {"loss", "loss_ldm", "loss_reg"} (scalars; only "loss" carries gradients needed)."""
        prompts, queries = list(batch["prompt"]), list(batch["query"])
        b = len(prompts)
        precomputed = None
        if batch.get("prompt_states") is not None:
            precomputed = torch.cat([batch["prompt_states"], batch["query_states"]])
        texts = self.encode_texts(prompts + queries, precomputed)
        prompt_states, z_q = texts[:b], texts[b:]
        if "latent_mean" in batch:
            latents = self.sample_latents(batch["latent_mean"], batch["latent_std"], generator)
        else:
            latents = self.encode_latents(batch["pixel_values"], generator, batch.get("key"))
        tokens, scales = self.subject_tokens(z_q, batch["clip_pixel_values"], single_scale)
        self.set_subject_context(tokens)

        device = latents.device
        schedule = self.noise_scheduler
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (b,), generator=generator, device=device)
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        noisy = schedule.add_noise(latents, noise, timesteps)
        prediction_type = schedule.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = schedule.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r} in the noise scheduler config")
        prediction = self._unet(noisy, timesteps, prompt_states)
        loss_ldm = F.mse_loss(prediction.float(), target.float())
        dropped = batch.get("subject_dropped")
        rows = None if self.reg_on_dropped_subjects or dropped is None else ~dropped.to(tokens.device, torch.bool)
        loss_reg = self.regularization(tokens, scales, z_q, rows)
        return {"loss": loss_ldm + self.tau * loss_reg, "loss_ldm": loss_ldm.detach(), "loss_reg": loss_reg.detach()}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, clip_pixel_values: torch.Tensor, queries: Sequence[str], prompts: Sequence[str],
                 generator: torch.Generator, height: int, width: int, steps: int = 30,
                 guidance_scale: float = 7.5, subject_scale: float = 1.0,
                 logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images of the subjects in ``clip_pixel_values`` [N, 3, C, C] (with their queries)
        following ``prompts`` -> [N, 3, height, width] in [0, 1]. DDIM, classifier-free guidance
        whose unconditional rows use "" and the unconditional subject (zero CLIP input, ""
        query), as at inference. ``logit_bias`` [N, 257]: mask queries (ssr.mask_logit_bias);
        the unconditional subject gets the same bias, as at inference (docs/method.md, section 5)."""
        from diffusers import DDIMScheduler

        n = len(prompts)
        device = clip_pixel_values.device
        text = self.encode_texts(list(prompts) + [""])
        cond_text, uncond_text = text[:n], text[n:].expand(n, -1, -1)
        subject, _ = self.subject_tokens(self.encode_texts(list(queries)), clip_pixel_values, logit_bias=logit_bias)
        size = clip_pixel_values.shape[-1]
        if logit_bias is None:
            uncond, _ = self.subject_tokens(self.encode_texts([""]), unconditional_pixels(1, size).to(device))
        else:
            uncond, _ = self.subject_tokens(self.encode_texts([""] * n), unconditional_pixels(n, size).to(device),
                                            logit_bias=logit_bias)
        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        latents = torch.randn((n, self.unet.config.in_channels, height // factor, width // factor),
                              generator=generator, device=device) * scheduler.init_noise_sigma
        previous_scale = self.attention.scale
        try:
            self.attention.scale = subject_scale
            self.set_subject_context(torch.cat([subject, uncond.expand(n, -1, -1) if len(uncond) == 1 else uncond]))
            both_text = torch.cat([cond_text, uncond_text])
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                eps_cond, eps_uncond = self._unet(x, t.expand(2 * n), both_text).float().chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = scheduler.step(eps, t, latents).prev_sample
        finally:
            self.attention.scale = previous_scale
            self.set_subject_context(None)
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)
