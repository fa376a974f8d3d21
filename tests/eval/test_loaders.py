"""Every scoring-model format loads, embeds as an independent computation on the same
weights does, and wrong files are refused with the file named and what was expected."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.eval.conftest import pattern_image
from trainer.evaluation.loaders import ModelFileError, load_aesthetic, load_aesthetic_head, load_clip, load_dino

IMAGES = [pattern_image(i, size) for i, size in enumerate([(96, 80), (64, 128), (300, 200)])]
TEXTS = ["a dog on the beach", "a red backpack", "a cat wearing a santa hat"]


def torchvision_transform(resize: int, crop: int, mean, std):
    """The reference preprocessing, written with torchvision's transforms."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop), T.ToTensor(),
                      T.Normalize(mean, std)])


CLIP_T = torchvision_transform(224, 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
DINO_T = torchvision_transform(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_open_clip_files_match_open_clip_itself(model_files):
    """safetensors and weights-only .pt; reference: open_clip's own encode_image/encode_text on
    the module that was written, with its tokenizer and torchvision preprocessing."""
    import open_clip

    ref = model_files.open_clip_model
    with torch.no_grad():
        ref_img = F.normalize(ref.encode_image(torch.stack([CLIP_T(i) for i in IMAGES])), dim=-1)
        ref_txt = F.normalize(ref.encode_text(open_clip.tokenize(TEXTS)), dim=-1)
    for path in (model_files.open_clip_safetensors, model_files.open_clip_pt):
        clip = load_clip(path)
        assert path in clip.describe and "vision width 64" in clip.describe
        torch.testing.assert_close(clip.embed_images(IMAGES), ref_img, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(clip.embed_texts(TEXTS), ref_txt, atol=2e-5, rtol=1e-4)


def test_open_clip_file_with_named_architecture(tmp_path):
    """--clip-arch: an open_clip model built by name (here RN-free ViT-B-32 layout is too big,
    so a tiny registered config is used) loads strictly by name."""
    import open_clip

    from tests.eval import eval_models as em

    model = em.tiny_open_clip(seed=11)
    name = "tiny-eval-test"
    open_clip.factory._MODEL_CONFIGS[name] = {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"layers": 2, "width": 64, "patch_size": 32, "image_size": 224, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    try:
        path = str(tmp_path / "wrapped.pt")
        # an open_clip training checkpoint: {"state_dict": {"module.<key>": ...}} (DDP prefix)
        torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
        clip = load_clip(path, arch=name)
        with torch.no_grad():
            ref = F.normalize(model.encode_image(torch.stack([CLIP_T(i) for i in IMAGES])), dim=-1)
        torch.testing.assert_close(clip.embed_images(IMAGES), ref, atol=2e-5, rtol=1e-4)
    finally:
        del open_clip.factory._MODEL_CONFIGS[name]


def test_hf_clip_folder_matches_transformers(model_files):
    """Reference: transformers' CLIPProcessor + CLIPModel on the same folder."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_files.hf_clip).eval()
    processor = CLIPProcessor.from_pretrained(model_files.hf_clip, use_fast=False)  # PIL resizing, as CLIP was trained
    inputs = processor(text=TEXTS, images=IMAGES, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    clip = load_clip(model_files.hf_clip)
    torch.testing.assert_close(clip.embed_images(IMAGES), F.normalize(out.image_embeds, dim=-1), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(clip.embed_texts(TEXTS), F.normalize(out.text_embeds, dim=-1), atol=1e-5, rtol=1e-4)


def test_hf_dino_and_dinov2_folders_match_transformers(model_files):
    """Reference: the CLS token of last_hidden_state from transformers' own model, with
    torchvision's resize-256 / crop-224 / ImageNet-normalise preprocessing."""
    from transformers import Dinov2Model, ViTModel

    pixels = torch.stack([DINO_T(i) for i in IMAGES])
    for folder, cls, name in ((model_files.hf_dino, ViTModel, "DINO (Hugging Face ViTModel)"),
                              (model_files.hf_dinov2, Dinov2Model, "DINOv2 (Hugging Face Dinov2Model)")):
        with torch.no_grad():
            ref = cls.from_pretrained(folder).eval()(pixel_values=pixels).last_hidden_state[:, 0]
        dino = load_dino(folder)
        assert dino.describe.startswith(name)
        torch.testing.assert_close(dino.embed_images(IMAGES), F.normalize(ref, dim=-1), atol=2e-5, rtol=1e-4)


def hand_vit_cls(state, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """DINO's ViT written out from its state dict: patchify, CLS + position embeddings,
    pre-norm blocks (LayerNorm eps 1e-6, exact GELU), final norm, CLS token. -> [N, D]."""
    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], 1) + state["pos_embed"]
    d = x.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        p = lambda n: state[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).chunk(3, -1)
        split = lambda t: t.view(len(t), -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        attn = (split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1) @ split(v)
        x = x + F.linear(attn.transpose(1, 2).reshape(len(x), -1, d), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return F.layer_norm(x, (d,), state["norm.weight"], state["norm.bias"], 1e-6)[:, 0]


def test_dino_hub_pth_matches_a_hand_written_vit(model_files):
    state = torch.load(model_files.dino_hub, weights_only=True)
    with torch.no_grad():
        ref = hand_vit_cls(state, torch.stack([DINO_T(i) for i in IMAGES]), heads=1)
    dino = load_dino(model_files.dino_hub)
    assert "torch.hub" in dino.describe
    torch.testing.assert_close(dino.embed_images(IMAGES), F.normalize(ref, dim=-1), atol=2e-5, rtol=1e-4)


def test_aesthetic_heads_match_a_hand_computation(model_files):
    """score = MLP(normalised CLIP image embedding), written out layer by layer (the dropouts
    are inactive at inference), and the linear head w.x + b."""
    clip = load_clip(model_files.open_clip_pt)
    emb = clip.embed_images(IMAGES)
    s = torch.load(model_files.aesthetic_mlp, weights_only=True)
    h = emb
    for i in (0, 2, 4, 6, 7):
        h = h @ s[f"layers.{i}.weight"].T + s[f"layers.{i}.bias"]
    scorer = load_aesthetic(model_files.aesthetic_mlp, model_files.open_clip_pt)
    torch.testing.assert_close(scorer.score(IMAGES), h[:, 0], atol=1e-5, rtol=1e-5)
    lin = torch.load(model_files.aesthetic_linear, weights_only=True)
    scorer = load_aesthetic(model_files.aesthetic_linear, model_files.open_clip_pt)
    torch.testing.assert_close(scorer.score(IMAGES), emb @ lin["weight"][0] + lin["bias"][0], atol=1e-5, rtol=1e-5)
    assert "MLP" in load_aesthetic_head(model_files.aesthetic_mlp)[1]


# ----------------------------------------------------------------------------- wrong files

class Payload:
    """Unpickling this would call os.system: the loaders must refuse it, not run it."""

    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_pickled_code_is_refused_not_run(tmp_path, model_files):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": Payload()}, f)
    for load in (load_dino, load_clip, load_aesthetic_head):
        with pytest.raises(Exception) as info:
            load(str(path))
        assert str(path) in str(info.value)
        assert "refused" in str(info.value) or "pickled" in str(info.value)


def test_wrong_files_are_named_with_what_was_expected(tmp_path, model_files):
    # a DINO file given as CLIP, a CLIP file given as DINO, a CLIP file given as aesthetic head
    with pytest.raises(ModelFileError, match="open_clip/OpenAI layout") as info:
        load_clip(model_files.dino_hub)
    assert model_files.dino_hub in str(info.value)
    with pytest.raises(ModelFileError, match="DINO's torch.hub ViT backbone") as info:
        load_dino(model_files.open_clip_pt)
    assert model_files.open_clip_pt in str(info.value)
    with pytest.raises(ModelFileError, match="LAION aesthetic head"):
        load_aesthetic_head(model_files.open_clip_safetensors)
    # a folder of the wrong model type, in both directions
    with pytest.raises(ModelFileError, match="model_type 'clip'"):
        load_clip(model_files.hf_dino)
    with pytest.raises(ModelFileError, match="DINOv2"):
        load_dino(model_files.hf_clip)
    # a vision-only CLIP folder has no text tower
    vision_only = tmp_path / "vision_only"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ModelFileError, match="no text tower"):
        load_clip(str(vision_only))
    # a config without weights, a missing path, a truncated file
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelFileError, match="no weights"):
        load_dino(str(empty))
    with pytest.raises(ModelFileError, match="not found"):
        load_clip(str(tmp_path / "missing.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(model_files.open_clip_safetensors, "rb").read()[:5000])
    with pytest.raises(Exception) as info:
        load_clip(str(truncated))
    assert str(truncated) in str(info.value)
    # a head whose width does not fit its CLIP
    wide = tmp_path / "wide_head.pth"
    from tests.eval import eval_models as em

    em.write_aesthetic_mlp(str(wide), width=48)
    with pytest.raises(ModelFileError, match="48-dim CLIP embeddings"):
        load_aesthetic(str(wide), model_files.open_clip_pt)
    # DINOv2 hub files are recognised and pointed to the supported format
    v2 = tmp_path / "dinov2_vits14_pretrain.pth"
    state = dict(torch.load(model_files.dino_hub, weights_only=True))
    state["blocks.0.ls1.gamma"] = torch.ones(64)
    torch.save(state, v2)
    with pytest.raises(ModelFileError, match="DINOv2 torch.hub"):
        load_dino(str(v2))


def test_image_modes_are_read_as_rgb(model_files):
    """Grey, palette and transparent images embed like their RGB version (transparency over white)."""
    dino = load_dino(model_files.hf_dino)
    rgb = pattern_image(3)
    grey = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    got = dino.embed_images([grey, rgba])
    ref = dino.embed_images([grey.convert("RGB"), rgb])
    torch.testing.assert_close(got, ref)
    assert isinstance(Image.new("P", (4, 4)), Image.Image)
