"""Query text -> z_q [B, 77, width] with the Stable Diffusion model's own CLIP text encoder.

Exactly 77 tokens (BOS, words, EOS, then padding *with the EOS id*, truncated at 77), last
hidden state after the final LayerNorm. No CLIP-skip, no emphasis syntax, no embeddings:
the query is plain text.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

CONTEXT_LENGTH = 77


def pad_with_eos(token_lists: Sequence[Sequence[int]], bos: int, eos: int,
                 length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Word-token id lists (no specials) -> [B, length] LongTensor: BOS, words (truncated so
    that EOS fits), EOS, EOS padding."""
    rows = []
    for tokens in token_lists:
        body = [bos] + list(tokens)[: length - 2] + [eos]
        rows.append(body + [eos] * (length - len(body)))
    return torch.tensor(rows, dtype=torch.long)


def hf_query_tokens(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Tokenise with a Hugging Face ``CLIPTokenizer`` -> [B, 77]. Padding uses the EOS id
    whatever the tokenizer's own pad token is (SD2's tokenizer pads with 0)."""
    words = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    return pad_with_eos(words, tokenizer.bos_token_id, tokenizer.eos_token_id)


class BpeQueryTokenizer:
    """CLIP's BPE tokenizer from the vocabulary open_clip ships (no download needed);
    the same ids as the Hugging Face ``openai/clip-vit-large-patch14`` tokenizer."""

    def __init__(self):
        from open_clip.tokenizer import SimpleTokenizer

        self._bpe = SimpleTokenizer()
        self.bos = self._bpe.encoder["<start_of_text>"]
        self.eos = self._bpe.encoder["<end_of_text>"]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """-> [B, 77] LongTensor."""
        return pad_with_eos([self._bpe.encode(t) for t in texts], self.bos, self.eos)


def encode_query_tokens(text_model: Callable, token_ids: torch.Tensor,
                        device: Optional[torch.device] = None) -> torch.Tensor:
    """token_ids [B, 77] -> z_q [B, 77, width], using a Hugging Face ``CLIPTextModel``
    (its ``last_hidden_state`` is taken after ``final_layer_norm``). ``device``: where to
    put the ids; default the model's first parameter's device (pass it when hooks move the
    model at call time, as the WebUI's low-VRAM mode does)."""
    if device is None:
        device = next(text_model.parameters()).device
    out = text_model(input_ids=token_ids.to(device))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def encode_queries(text_model, tokenizer, texts: List[str]) -> torch.Tensor:
    """Convenience: texts -> z_q [B, 77, width] with an HF tokenizer or ``BpeQueryTokenizer``."""
    ids = tokenizer(texts) if isinstance(tokenizer, BpeQueryTokenizer) else hf_query_tokens(tokenizer, texts)
    with torch.no_grad():
        return encode_query_tokens(text_model, ids)
