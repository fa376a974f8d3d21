"""Recognising SSR and CLIP weight files by their keys (nothing unpickled), and listing the choices."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ssr_webui.model_files import ModelFinder, classify_file, content_hash, kind_from_keys, torch_zip_strings


def _save(path, tensors, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {k: v.clone() for k, v in tensors.items()}  # no shared storage (safetensors refuses it)
    if fmt == "safetensors":
        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    return path


def test_kinds_from_keys():
    assert kind_from_keys(["encoder.to_q.weight", "attention.0.to_k.weight"]) == "ssr"
    assert kind_from_keys(["aligner.to_q.weight", "norm.weight"]) == "ssr-aligner"
    assert kind_from_keys(["to_q.weight", "to_k.weight", "to_v.0.weight", "norm.weight"]) == "ssr-aligner"
    assert kind_from_keys(["1.to_k_SSR.weight", "1.to_v_SSR.weight"]) == "ssr-layers"
    assert kind_from_keys(["vision_model.embeddings.patch_embedding.weight"]) == "clip"
    assert kind_from_keys(["visual.conv1.weight"]) == "clip"
    assert kind_from_keys(["model.diffusion_model.x"]) == "unknown"


def test_torch_keys_are_read_without_unpickling(tmp_path):
    path = _save(str(tmp_path / "a.bin"), {"aligner.to_q.weight": torch.zeros(2, 2), "norm.bias": torch.zeros(2)}, "torch")
    strings = torch_zip_strings(path)
    assert {"aligner.to_q.weight", "norm.bias"} <= strings
    assert classify_file(path) == ("ssr-aligner", "keys")


def test_listing(tmp_path):
    ssr_root, clip_root, cn_root = tmp_path / "ssr_encoder", tmp_path / "clip_vision", tmp_path / "cn"
    w = torch.zeros(2, 2)
    _save(str(ssr_root / "mine.safetensors"), {"encoder.to_q.weight": w, "attention.0.to_k.weight": w}, "safetensors")
    _save(str(ssr_root / "release" / "pytorch_model.bin"), {"aligner.to_q.weight": w, "norm.weight": w[0]}, "torch")
    _save(str(ssr_root / "release" / "pytorch_model_1.bin"), {"1.to_k_SSR.weight": w}, "torch")
    _save(str(ssr_root / "stray" / "pytorch_model_1.bin"), {"1.to_k_SSR.weight": w}, "torch")
    _save(str(ssr_root / "vit-l.safetensors"), {"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 14, 14)}, "safetensors")
    _save(str(ssr_root / "vit-h.safetensors"), {"vision_model.embeddings.patch_embedding.weight": torch.zeros(1280, 3, 1, 1)}, "safetensors")
    (ssr_root / "empty.pt").write_bytes(b"")
    _save(str(clip_root / "open_clip.pth"), {"visual.conv1.weight": w}, "torch")
    _save(str(cn_root / "clip_h.pth"), {"visual.conv1.weight": w}, "torch")
    _save(str(cn_root / "clip_vitl.pth"), {"vision_model.embeddings.patch_embedding.weight": w}, "torch")
    hf = clip_root / "openai-vit-l"
    _save(str(hf / "model.safetensors"), {"vision_model.embeddings.patch_embedding.weight": w}, "safetensors")
    (hf / "config.json").write_text('{"model_type": "clip_vision_model"}')

    listing = ModelFinder().scan(str(ssr_root), [("ssr_encoder", str(ssr_root)), ("clip_vision", str(clip_root)),
                                                 ("controlnet", str(cn_root))])
    assert listing.names("ssr") == ["mine.safetensors", "release/pytorch_model.bin"]
    assert listing.ssr[1].files[1].endswith("release/pytorch_model_1.bin")
    assert listing.names("clip") == ["ssr_encoder/vit-l.safetensors", "clip_vision/open_clip.pth",
                                     "clip_vision/openai-vit-l", "controlnet/clip_vitl.pth"]
    ignored = {os.path.relpath(p, ssr_root): why for p, why in listing.ignored}
    assert set(ignored) == {"empty.pt", "stray/pytorch_model_1.bin", "vit-h.safetensors"}
    assert "without their aligner" in ignored["stray/pytorch_model_1.bin"] and "ViT-H" in ignored["vit-h.safetensors"]
    assert listing.find("ssr", "pytorch_model.bin").name == "release/pytorch_model.bin"  # unique file name
    assert listing.find("ssr", "mine").name == "mine.safetensors"
    assert listing.find("clip", "nothing") is None


def test_content_hash_is_the_webui_sha256_prefix(tmp_path):
    import hashlib
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"alpha")
    b.write_bytes(b"beta")
    assert content_hash([str(a)]) == hashlib.sha256(b"alpha").hexdigest()[:8]
    pair = hashlib.sha256((hashlib.sha256(b"alpha").hexdigest() + hashlib.sha256(b"beta").hexdigest()).encode())
    assert content_hash([str(a), str(b)]) == pair.hexdigest()[:8]
