"""Mirrors modules/sd_hijack_clip.py: the WebUI's text-encoder wrapper (p.sd_model.cond_stage_model).

A prompt is tokenized (emphasis parsed, BREAK honoured, comma backtracking) into 75-token chunks; each chunk becomes
[BOS] + 75 tokens (padded with EOS) + [EOS] = 77 tokens and is encoded separately; the chunks are concatenated along
the token axis, so a prompt of 76..150 tokens gives a (154, C) conditioning. A batch is padded to the largest chunk
count with empty chunks. CLIP skip (opts.CLIP_stop_at_last_layers) takes hidden_states[-n] + final_layer_norm.
The HF model and tokenizer sit underneath: `.wrapped.transformer`, `.wrapped.tokenizer`.
Not reproduced: textual inversion embeddings.
"""
import math
from collections import namedtuple

import torch

from modules import devices, prompt_parser, shared

PromptChunkFix = namedtuple('PromptChunkFix', ['offset', 'embedding'])


class PromptChunk:
    """75 tokens (77 with BOS/EOS) and their emphasis multipliers."""

    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class FrozenCLIPEmbedderWithCustomWordsBase(torch.nn.Module):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.is_trainable = getattr(wrapped, 'is_trainable', False)
        self.input_key = getattr(wrapped, 'input_key', 'txt')
        self.return_pooled = getattr(self.wrapped, 'return_pooled', False)
        self.chunk_length = 75
        self.id_start = None
        self.id_end = None
        self.id_pad = None
        self.comma_token = None

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count):
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize(self, texts):
        raise NotImplementedError

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def tokenize_line(self, line):
        """-> (chunks, token_count) for one prompt line."""
        if shared.opts.emphasis != "None":
            parsed = prompt_parser.parse_prompt_attention(line)
        else:
            parsed = [[line, 1.0]]

        tokenized = self.tokenize([text for text, _ in parsed])
        chunks = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last=False):
            nonlocal token_count, last_comma, chunk
            if is_last:
                token_count += len(chunk.tokens)
            else:
                token_count += self.chunk_length
            to_add = self.chunk_length - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == 'BREAK' and weight == -1:
                next_chunk()
                continue

            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                # this is when we are at the end of allotted 75 tokens for the current chunk, and the current token is not a comma.
                # opts.comma_padding_backtrack is a setting that specifies that if there is a comma nearby, the text after the comma
                # should be moved out of this chunk and into the next.
                elif shared.opts.comma_padding_backtrack != 0 and len(chunk.tokens) == self.chunk_length and last_comma != -1 and len(chunk.tokens) - last_comma <= shared.opts.comma_padding_backtrack:
                    break_location = last_comma + 1
                    reloc_tokens = chunk.tokens[break_location:]
                    reloc_mults = chunk.multipliers[break_location:]
                    chunk.tokens = chunk.tokens[:break_location]
                    chunk.multipliers = chunk.multipliers[:break_location]
                    next_chunk()
                    chunk.tokens = reloc_tokens
                    chunk.multipliers = reloc_mults

                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()

                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1

        if chunk.tokens or not chunks:
            next_chunk(is_last=True)

        return chunks, token_count

    def process_texts(self, texts):
        token_count = 0
        cache = {}
        batch_chunks = []
        for line in texts:
            if line in cache:
                chunks = cache[line]
            else:
                chunks, current_token_count = self.tokenize_line(line)
                token_count = max(current_token_count, token_count)
                cache[line] = chunks
            batch_chunks.append(chunks)
        return batch_chunks, token_count

    def forward(self, texts):
        """texts: list of prompts -> (B, 77 * max_chunks, C)."""
        batch_chunks, token_count = self.process_texts(texts)
        chunk_count = max([len(x) for x in batch_chunks])

        zs = []
        for i in range(chunk_count):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            tokens = [x.tokens for x in batch_chunk]
            multipliers = [x.multipliers for x in batch_chunk]
            self.hijack.fixes = [x.fixes for x in batch_chunk]
            z = self.process_tokens(tokens, multipliers)
            zs.append(z)

        if shared.opts.emphasis != "Original":
            self.hijack.extra_generation_params["Emphasis"] = shared.opts.emphasis

        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        tokens = torch.asarray(remade_batch_tokens).to(devices.device)

        # this is for SD2: SD1 uses the same token for padding and end of text, while SD2 uses different ones.
        if self.id_end != self.id_pad:
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad

        z = self.encode_with_transformers(tokens)

        if shared.opts.emphasis in ("Original", "No norm"):
            batch_multipliers = torch.asarray(batch_multipliers).to(devices.device, dtype=z.dtype)
            original_mean = z.mean()
            z = z * batch_multipliers.reshape(batch_multipliers.shape + (1,)).expand(z.shape)
            if shared.opts.emphasis == "Original":
                new_mean = z.mean()
                z = z * (original_mean / new_mean)
        return z


class FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    """SD1: the wrapped ldm FrozenCLIPEmbedder has .tokenizer (HF CLIPTokenizer) and .transformer (HF CLIPTextModel)."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(',</w>', None)
        self.id_start = self.wrapped.tokenizer.bos_token_id
        self.id_end = self.wrapped.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        tokenized = self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
        return tokenized

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-shared.opts.CLIP_stop_at_last_layers)
        if shared.opts.CLIP_stop_at_last_layers > 1:
            z = outputs.hidden_states[-shared.opts.CLIP_stop_at_last_layers]
            z = self.wrapped.transformer.text_model.final_layer_norm(z)
        else:
            z = outputs.last_hidden_state
        return z


class FrozenOpenCLIPEmbedderWithCustomWordsLike(FrozenCLIPEmbedderWithCustomWords):
    """SD2-like: as the WebUI's FrozenOpenCLIPEmbedderWithCustomWords, the pad token (0) differs from the end token,
    so everything after the first EOS becomes 0. (The real one wraps an open_clip model; a HF CLIP stands in.)"""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.id_pad = 0
