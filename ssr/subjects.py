"""From user subjects (image + text query or mask) to the subject context of a generation.

``SubjectEmbedder`` runs CLIP vision, the query encoder and the aligner once per subject,
caches the results by content (image bytes, query, mask, weights) and builds the two
contexts the attention handle needs: the subjects' tokens and the unconditional tokens.

Several subjects (docs/method.md, section 7): each is encoded separately (462 tokens) and the
contexts are concatenated, so one softmax runs over all subjects' tokens. A subject's
``weight`` multiplies its tokens' *values*: its share of the branch output is scaled by the
weight while the attention distribution stays as trained (1 is the reference behaviour).
Weight 0 removes the subject: its tokens are left out of the context altogether (it is not
even encoded), so the result is bit-identical to not giving that subject; when every
subject has weight 0 the context is empty and the branch is not applied.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .cache import LRU
from .image_encoder import ClipImageEncoder, ImageLike, clip_preprocess, mask_logit_bias, to_pil_rgb, unconditional_pixels
from .subject_encoder import attention_heatmap
from .weights import SSRWeights

TextEncoder = Callable[[List[str]], torch.Tensor]  # texts -> [B, 77, D]


@dataclass
class Subject:
    """One selected subject. ``mask``: white/1 = selected, None = text query mode."""

    image: ImageLike
    query: str = ""
    mask: Optional[ImageLike] = None
    weight: float = 1.0
    mask_weight: float = 5.0

    @property
    def mode(self) -> str:
        return "mask" if self.mask is not None else "text"


@dataclass
class EncodedSubjects:
    """tokens: [2, S*462, D] (row 0 subjects, row 1 unconditional) over the S subjects that
    are used (weight != 0; ``used`` holds their indices in the list given to ``encode``);
    value_weights [S*462]; attention: per used subject A [heads, 77, 257]; heatmaps: per used
    subject [16, 16] in [0,1]. With no subject used, tokens is [2, 0, D] (``empty``)."""

    tokens: torch.Tensor
    value_weights: torch.Tensor
    attention: List[torch.Tensor] = field(default_factory=list)
    heatmaps: List[torch.Tensor] = field(default_factory=list)
    used: List[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.tokens.shape[1] == 0

    SUBJECT, UNCONDITIONAL = 0, 1


def _digest(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.shape).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return h.hexdigest()


class SubjectEmbedder:
    """Encodes subjects with a CLIP image encoder, SSR weights and the SD text encoder.

    ``model_key`` identifies the (CLIP, SSR, SD text encoder) triple in cache keys; a new
    triple needs a new embedder or a different key. Results are cached on CPU (LRU).
    """

    def __init__(self, image_encoder: ClipImageEncoder, ssr: SSRWeights, encode_text: TextEncoder,
                 model_key: str = "", cache_size: int = 32):
        self.image_encoder = image_encoder
        self.ssr = ssr
        self.encode_text = encode_text
        self.model_key = model_key
        self._cache = LRU(cache_size)  # key -> (c_s [462, D], A [heads, 77, T]) on CPU

    @property
    def cache_hits(self) -> int:
        return self._cache.hits

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, queries: List[str], bias: Optional[torch.Tensor]):
        """pixels [B,3,S,S], queries B texts, bias [B,T] or None -> (c_s [B,462,D], A [B,h,77,T])."""
        states = self.image_encoder(pixels)
        enc = self.ssr.encoder
        param = next(enc.parameters())
        z_q = self.encode_text(queries).to(device=param.device, dtype=param.dtype)
        states = [s.to(device=param.device, dtype=param.dtype) for s in states]
        tokens, attn = enc(z_q, states, None if bias is None else bias.to(param.device))
        return tokens.float().cpu(), attn.float().cpu()

    def encode(self, subjects: Sequence[Subject]) -> EncodedSubjects:
        """Subjects -> contexts for ``SubjectAttention.set_context(result.tokens, result.value_weights)``.

        Subjects with weight 0 are left out (see the module docstring); if that is all of them,
        the result is ``empty`` and ``set_context`` switches the branch off."""
        if not subjects:
            raise ValueError("no subjects to encode")
        used = [i for i, s in enumerate(subjects) if float(s.weight) != 0.0]
        if not used:
            width = self.ssr.attention.context_dim
            return EncodedSubjects(torch.zeros(2, 0, width), torch.zeros(0))
        encoded = self._encode_subjects([subjects[i] for i in used])
        encoded.used = used
        return encoded

    def _encode_subjects(self, subjects: Sequence[Subject]) -> EncodedSubjects:
        size = self.image_encoder.config.image_size
        grid = self.image_encoder.config.grid
        rgb = [to_pil_rgb(s.image, what=f"subject {i + 1} image") for i, s in enumerate(subjects)]
        biases = [None if s.mask is None else mask_logit_bias(s.mask, s.mask_weight, grid, what=f"subject {i + 1} mask",
                                                              image_size=im.size, size=size)
                  for i, (s, im) in enumerate(zip(subjects, rgb))]
        keys = [_digest(self.model_key, np.asarray(im), s.query, None if b is None else b.numpy())
                for im, s, b in zip(rgb, subjects, biases)]
        found = [self._cache.get(k) for k in keys]
        todo = [i for i, hit in enumerate(found) if hit is None]
        if todo:
            pixels = clip_preprocess([rgb[i] for i in todo], size)
            bias = None
            if any(biases[i] is not None for i in todo):
                bias = torch.stack([biases[i] if biases[i] is not None else torch.zeros(grid * grid + 1) for i in todo])
            tokens, attn = self._encode(pixels, [subjects[i].query for i in todo], bias)
            for j, i in enumerate(todo):
                found[i] = (tokens[j], attn[j])
                self._cache.put(keys[i], found[i])
        cond = found  # read from here, not the cache: a small cache may already have evicted some
        uncond = [self.unconditional(b) for b in biases]
        per_subject = cond[0][0].shape[0]
        weights = torch.cat([torch.full((per_subject,), float(s.weight)) for s in subjects])
        tokens = torch.stack([torch.cat([c[0] for c in cond]), torch.cat(uncond)])
        return EncodedSubjects(tokens, weights, [c[1] for c in cond],
                               [attention_heatmap(c[1][None], grid)[0] for c in cond], list(range(len(subjects))))

    def unconditional(self, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """aligner(text_encoder(""), clip(zero input)) -> [462, D], with the subject's mask bias
        if it has one (the reference applies the same bias to both branches). Cached."""
        key = _digest(self.model_key, "uncond", None if bias is None else bias.numpy())
        hit = self._cache.get(key)
        if hit is None:
            size = self.image_encoder.config.image_size
            tokens, attn = self._encode(unconditional_pixels(1, size), [""], None if bias is None else bias[None])
            hit = (tokens[0], attn[0])
            self._cache.put(key, hit)
        return hit[0]

    def preview(self, subject: Subject) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (heatmap [grid, grid] in [0,1], A [heads, 77, T]) of one subject's query (its
        weight plays no part in what it selects, so weight 0 is previewed too)."""
        encoded = self._encode_subjects([subject])
        return encoded.heatmaps[0], encoded.attention[0]
