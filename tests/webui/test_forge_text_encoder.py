"""Queries through Forge's text encoder (``forge_objects.clip``) when it still holds a half
checkpoint's embeddings: Forge's own prompt encoder turns the token and position embeddings to
float32 before it encodes, and so must we, since a preview can come before any generation
(found by the Forge browser test: "LayerNormKernelImpl" not implemented for 'Half'). The text
model is a tiny HF ``CLIPTextModel`` with random weights; the reference is a float32 copy of it
with the same (half-rounded) embedding values. The weights are made in inference mode as Forge
loads them, and the host's own encoding (in inference mode) must still work afterwards; the
failure that this guards against ("Inference tensors do not track version counter" at the
host's next prompt, after a conversion outside inference mode) was seen in Forge on torch 2.1.2
(tests/realhost_forks/test_fork_browser.py), not with this venv's torch."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from ssr.query_encoder import encode_query_tokens, hf_query_tokens
from ssr_webui.runtime import sd_query_encoder
from tests import tiny_models as tm


class _Tokenizer:
    """The part of a Hugging Face ``CLIPTokenizer`` the query encoder uses."""

    bos_token_id, eos_token_id = 49406, 49407

    def __call__(self, texts, add_special_tokens=False, truncation=False):
        return {"input_ids": [[320 + i, 1929, 530 + 3 * i] for i, _ in enumerate(texts)]}


def _forge_model(transformer):
    clip = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=SimpleNamespace(transformer=transformer)),
                           tokenizer=SimpleNamespace(clip_l=_Tokenizer()), patcher=None)
    return SimpleNamespace(forge_objects=SimpleNamespace(clip=clip))


def test_half_embeddings_encode_in_float32_like_the_host():
    model = tm.tiny_text_encoder(seed=3).model
    embeddings = getattr(model, "text_model", model).embeddings  # transformers 4 (the hosts) / 5 (here)
    with torch.inference_mode():  # Forge loads its models in inference mode: inference-tensor weights
        embeddings.token_embedding.half()
        embeddings.position_embedding.half()
    reference = copy.deepcopy(model)
    getattr(reference, "text_model", reference).embeddings.float()
    texts = ["the dog", "a red cup"]
    with torch.no_grad():
        want = encode_query_tokens(reference, hf_query_tokens(_Tokenizer(), texts))

    got = sd_query_encoder(_forge_model(model), tm.TINY_CONTEXT_DIM)(texts)

    assert got.dtype == torch.float32 and got.shape == (2, 77, tm.TINY_CONTEXT_DIM)
    assert torch.equal(got, want)
    assert embeddings.token_embedding.weight.dtype == torch.float32
    with torch.inference_mode():  # the host's own prompt encoding afterwards still works
        again = model(input_ids=hf_query_tokens(_Tokenizer(), texts)).last_hidden_state
    assert torch.equal(again, want)
