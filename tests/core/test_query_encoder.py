"""Query tokens (77, BOS + words + EOS, EOS padding) and z_q = last hidden state after the
final LayerNorm (docs/method.md, section 3)."""
from __future__ import annotations

import json

import pytest
import torch

from ssr.query_encoder import encode_query_tokens, hf_query_tokens, pad_with_eos

BOS, EOS = 49406, 49407  # CLIP's <|startoftext|>, <|endoftext|>
TEXTS = ["a dog on the beach!", "A Photo of SKS dog, 4k", "", "  the   cat  "]


def test_pad_with_eos():
    ids = pad_with_eos([[5, 6, 7], list(range(100, 110)), []], bos=1, eos=2, length=8)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[1, 5, 6, 7, 2, 2, 2, 2], [1, 100, 101, 102, 103, 104, 105, 2], [1, 2, 2, 2, 2, 2, 2, 2]]


@pytest.fixture(scope="module")
def bpe(text_encoder_tiny):
    return text_encoder_tiny.tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, bpe):
    """A Hugging Face CLIPTokenizer built from the same BPE vocabulary (no download)."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip_tokenizer")
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in bpe._bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe._bpe.bpe_ranks.items(), key=lambda item: item[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    return tok


def test_bpe_tokenizer_layout(bpe):
    ids = bpe(TEXTS)
    assert ids.shape == (4, 77) and ids.dtype == torch.long
    assert (ids[:, 0] == BOS).all()
    assert ids[2, 1:].eq(EOS).all()  # "" -> BOS then EOS everywhere
    for row in ids:
        first_eos = row.tolist().index(EOS)
        assert row[first_eos:].eq(EOS).all() and not row[1:first_eos].eq(EOS).any()


def test_bpe_tokenizer_agrees_with_open_clip_tokenize(bpe):
    """open_clip.tokenize pads with 0; up to and including EOS the ids must agree."""
    import open_clip

    ref = open_clip.tokenize(TEXTS)
    ours = bpe(TEXTS)
    for r, o in zip(ref, ours):
        n = r.tolist().index(EOS) + 1
        assert o[:n].tolist() == r[:n].tolist()


def test_hf_tokenizer_gives_same_ids_with_eos_padding(hf_tokenizer, bpe):
    assert torch.equal(hf_query_tokens(hf_tokenizer, TEXTS), bpe(TEXTS))
    hf_tokenizer.pad_token = "!"  # SD2's tokenizer pads with id 0; queries still pad with EOS
    assert torch.equal(hf_query_tokens(hf_tokenizer, TEXTS), bpe(TEXTS))


def test_long_query_is_truncated_with_eos_last(bpe, hf_tokenizer):
    long = " ".join(["dog"] * 200)
    for ids in (bpe([long])[0], hf_query_tokens(hf_tokenizer, [long])[0]):
        assert ids.shape == (77,) and ids[0] == BOS and ids[-1] == EOS
        assert not ids[1:-1].eq(EOS).any()


def test_z_q_is_last_hidden_state_after_final_layer_norm(text_encoder_tiny):
    model = text_encoder_tiny.model
    ids = text_encoder_tiny.tokenizer(["a red dog", ""])
    with torch.no_grad():
        z_q = encode_query_tokens(model, ids)
        out = model(input_ids=ids, output_hidden_states=True)
        final_norm = getattr(model, "text_model", model).final_layer_norm  # transformers 5 flattened it
        expected = final_norm(out.hidden_states[-1])
    assert z_q.shape == (2, 77, 32)
    assert torch.allclose(z_q, expected, atol=1e-6)
    assert not torch.allclose(out.hidden_states[-1], expected, atol=1e-2)  # the LayerNorm matters
    assert torch.allclose(text_encoder_tiny(["a red dog", ""]), z_q, atol=1e-6)
