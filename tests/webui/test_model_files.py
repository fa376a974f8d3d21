"""Recognising SSR and CLIP weight files by their keys (nothing unpickled), and listing the choices."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from ssr.files import read_tensor_headers
from ssr_webui.model_files import ModelFinder, classify_file, content_hash, kind_from_keys


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


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): a stand-in for malicious pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_torch_keys_are_read_without_running_anything(tmp_path):
    path = _save(str(tmp_path / "a.bin"), {"aligner.to_q.weight": torch.zeros(2, 3), "norm.bias": torch.zeros(2)}, "torch")
    shapes, _ = read_tensor_headers(path)
    assert shapes == {"aligner.to_q.weight": (2, 3), "norm.bias": (2,)}
    assert classify_file(path) == ("ssr-aligner", "keys")
    marker = str(tmp_path / "code_ran")
    evil = str(tmp_path / "evil.bin")
    torch.save({"aligner.to_q.weight": torch.zeros(2, 3), "payload": _RunsCode(marker)}, evil)
    kind, why = classify_file(evil)
    assert kind == "unknown" and "os" in why and "mkdir" in why, why
    assert not os.path.exists(marker)


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
    _save(str(cn_root / "clip_h.pth"), {"visual.conv1.weight": torch.zeros(1280, 3, 1, 1)}, "torch")  # ViT-H-wide
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
    ignored = {listing.display(p): why for p, why in listing.ignored}
    assert set(ignored) == {"ssr_encoder/empty.pt", "ssr_encoder/stray/pytorch_model_1.bin", "ssr_encoder/vit-h.safetensors",
                            "controlnet/clip_h.pth"}
    ignored = {k.replace("ssr_encoder/", ""): v for k, v in ignored.items()}
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


# ----------------------------------------------------------------------------- issue 9: content, not names

def _official_pair(folder, context_dim, seed=0):
    from ssr.weights import official_state_dicts
    from tests.tiny_models import tiny_ssr_weights

    aligner, layers = official_state_dicts(tiny_ssr_weights(seed=seed, context_dim=context_dim))
    _save(str(folder / "pytorch_model.bin"), aligner, "torch")
    _save(str(folder / "pytorch_model_1.bin"), layers, "torch")


def _scan(ssr_root, *clip_roots):
    roots = [("ssr_encoder", str(ssr_root))] + [(os.path.basename(str(r)), str(r)) for r in clip_roots]
    listing = ModelFinder().scan(str(ssr_root), roots)
    ignored = {os.path.basename(os.path.dirname(p)) + "/" + os.path.basename(p): why for p, why in listing.ignored}
    return listing, ignored


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # building the archive
def test_torchscript_is_never_offered_whatever_its_name(tmp_path):
    """OpenAI's ViT-L-14.pt is TorchScript (loading it runs code): ignored with how to
    convert it; a file is never taken for CLIP because its name says clip or vit."""
    clip_root, ssr_root = tmp_path / "clip_vision", tmp_path / "ssr_encoder"
    clip_root.mkdir()
    ssr_root.mkdir()
    traced = torch.jit.trace(torch.nn.Linear(3, 2), torch.zeros(1, 3))
    torch.jit.save(traced, str(clip_root / "ViT-L-14.pt"))
    (clip_root / "clip_vit_l.pth").write_bytes(b"\x80\x02}q\x00.")  # a legacy-looking pickle of {}: no tensors
    (clip_root / "vit-clip.bin").write_text("<html>not found</html>")
    _save(str(clip_root / "model.pt"), {"visual.conv1.weight": torch.zeros(4, 3, 14, 14)}, "torch")
    listing, ignored = _scan(ssr_root, clip_root)
    assert listing.names("clip") == ["clip_vision/model.pt"]  # found by its keys, not its name
    assert set(ignored) == {"clip_vision/ViT-L-14.pt", "clip_vision/clip_vit_l.pth", "clip_vision/vit-clip.bin"}
    why = ignored["clip_vision/ViT-L-14.pt"]
    assert "TorchScript" in why and "runs code" in why and "--trust-torchscript" in why, why
    assert classify_file(str(clip_root / "ViT-L-14.pt"))[0] == "unknown"


def test_broken_and_other_family_weights_are_ignored_with_the_reason(tmp_path):
    ssr_root = tmp_path / "ssr_encoder"
    _official_pair(ssr_root / "good", 32, seed=1)
    _official_pair(ssr_root / "legacy", 32, seed=1)
    for name in ("pytorch_model.bin", "pytorch_model_1.bin"):  # pre-1.6 torch format: keys still readable
        sd = torch.load(str(ssr_root / "good" / name), weights_only=True)
        torch.save(sd, str(ssr_root / "legacy" / name), _use_new_zipfile_serialization=False)
    _official_pair(ssr_root / "sd2", 1024, seed=2)
    _official_pair(ssr_root / "cut", 32, seed=3)
    data = (ssr_root / "cut" / "pytorch_model.bin").read_bytes()
    (ssr_root / "cut" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    _official_pair(ssr_root / "cut_layers", 32, seed=4)
    data = (ssr_root / "cut_layers" / "pytorch_model_1.bin").read_bytes()
    (ssr_root / "cut_layers" / "pytorch_model_1.bin").write_bytes(data[: len(data) - 4000])
    from ssr.weights import load_ssr_weights, save_ssr_weights
    save_ssr_weights(load_ssr_weights(str(ssr_root / "good"), expect_family=None), str(ssr_root / "single.safetensors"))
    data = (ssr_root / "single.safetensors").read_bytes()
    (ssr_root / "cut_single.safetensors").write_bytes(data[: len(data) - 100])
    save_ssr_weights(load_ssr_weights(str(ssr_root / "sd2"), expect_family=None), str(ssr_root / "sdxl_like.safetensors"))

    listing, ignored = _scan(ssr_root)
    assert listing.names("ssr") == ["good/pytorch_model.bin", "legacy/pytorch_model.bin", "single.safetensors"]
    sd2 = "these SSR weights are for SD2.x, 1024-wide text context; SD1.x weights are needed"
    assert sd2 in ignored["sd2/pytorch_model.bin"] and sd2 in ignored["ssr_encoder/sdxl_like.safetensors"]
    assert "truncated" in ignored["cut/pytorch_model.bin"] and "re-download" in ignored["cut/pytorch_model.bin"]
    assert "truncated" in ignored["cut_layers/pytorch_model.bin"] or "truncated" in ignored["cut_layers/pytorch_model_1.bin"]
    assert "truncated" in ignored["ssr_encoder/cut_single.safetensors"]
    for why in ignored.values():  # reasons are about the file, not where it lies
        assert str(tmp_path) not in why


def test_clip_h_is_ignored_by_its_shapes_not_its_name(tmp_path):
    ssr_root, cn_root = tmp_path / "ssr_encoder", tmp_path / "controlnet"
    ssr_root.mkdir()
    _save(str(cn_root / "image_encoder.pth"), {"vision_model.embeddings.patch_embedding.weight": torch.zeros(1280, 3, 1, 1)}, "torch")
    _save(str(cn_root / "clip_h.pth"), {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 14, 14)}, "torch")
    listing, ignored = _scan(ssr_root, cn_root)
    assert listing.names("clip") == ["controlnet/clip_h.pth"]  # its content is a (tiny) ViT; the name says nothing
    assert "ViT-H" in ignored["controlnet/image_encoder.pth"]
