"""ClipImageEncoder (open_clip tower, our block walk) against transformers' CLIPVisionModel,
and every CLIP vision file format through ssr.clip_checkpoints.load_clip_image_encoder.

One tiny random CLIP (width 128, 2 heads of 64, 24 layers, 224 px, patch 14 -> 257 tokens,
QuickGELU) is saved in each format; all must give the HF model's hidden states after blocks
4, 8, ..., 24 within 1e-5 relative (fp32).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from ssr import convert
from ssr.clip_checkpoints import load_clip_image_encoder
from ssr.files import WeightFileError
from tests.tiny_models import TINY_CLIP_LAYERS, OpenAIClipLayout, tiny_hf_clip_vision

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # building OpenAI's TorchScript layout

REL_TOL = 1e-5
SCALES = [4, 8, 12, 16, 20, 24]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_clip_vision(seed=5)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_states(hf_model, pixels):
    """Reference: HF hidden_states[i] is the output of block i (index 0 = after pre_layrnorm)."""
    with torch.no_grad():
        out = hf_model(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == TINY_CLIP_LAYERS + 1
    return [out.hidden_states[i] for i in SCALES]


def assert_matches_hf(encoder, pixels, hf_states):
    with torch.no_grad():
        states = encoder(pixels)
    assert len(states) == 6
    for k, (ours, ref) in enumerate(zip(states, hf_states)):
        assert ours.shape == ref.shape == (2, 257, 128), k
        assert rel_err(ours, ref) < REL_TOL, f"scale {k + 1} (block {SCALES[k]}): rel err {rel_err(ours, ref):.2e}"


@pytest.fixture(scope="module")
def formats(tmp_path_factory, hf_model):
    """path of each supported file format, all holding hf_model's weights."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip_formats")
    paths = {}
    # Hugging Face folders. transformers 5 saves CLIPVisionModel keys without the
    # `vision_model.` prefix; older releases and the openai/clip-vit-large-patch14 repo (a
    # CLIPModel: nested vision_config, text tower too) have it. Cover both.
    bare = {k: v.clone() for k, v in hf_model.state_dict().items()}
    bare = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in bare.items()}
    sd = {"vision_model." + k: v for k, v in bare.items()}
    g = torch.Generator().manual_seed(9)
    extra = {"text_model.embeddings.token_embedding.weight": torch.randn(10, 16, generator=g),
             "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
             "visual_projection.weight": torch.randn(32, 128, generator=g),
             "text_projection.weight": torch.randn(32, 16, generator=g), "logit_scale": torch.tensor(4.6)}
    paths["hf_folder_safetensors"] = str(root / "hf_st")
    hf_model.save_pretrained(paths["hf_folder_safetensors"])
    assert "model.safetensors" in os.listdir(paths["hf_folder_safetensors"])
    folder = root / "hf_bin"  # CLIPVisionModel folder as transformers 4 wrote it
    folder.mkdir()
    hf_model.config.to_json_file(str(folder / "config.json"))
    torch.save(sd, str(folder / "pytorch_model.bin"))
    paths["hf_folder_bin"] = str(folder)
    folder = root / "hf_clipmodel"  # CLIPModel folder with both weight files
    folder.mkdir()
    vision_cfg = hf_model.config.to_dict()
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "model_type": "clip",
                                                    "vision_config": vision_cfg, "text_config": {"hidden_size": 16}}))
    save_file({**sd, **extra}, str(folder / "model.safetensors"))
    torch.save({**sd, **extra}, str(folder / "pytorch_model.bin"))
    paths["hf_folder_both"] = str(folder)

    # single files: with the prefix (plus text tower / projection keys, ignored), and without
    paths["hf_single_prefixed"] = str(root / "clip_vision_prefixed.safetensors")
    save_file({**sd, **extra}, paths["hf_single_prefixed"])
    # single file without the prefix (a CLIPVisionTransformer's own state dict), as .pth
    paths["hf_single_bare"] = str(root / "clip_vitl.pth")
    torch.save({**bare, "visual_projection.weight": extra["visual_projection.weight"]}, paths["hf_single_bare"])

    # open_clip layout: take the tower we load from HF (checked against HF separately)
    visual = load_clip_image_encoder(paths["hf_folder_safetensors"], expect_width=None).visual
    oc = {"visual." + k: v.clone() for k, v in visual.state_dict().items()}
    text = {"token_embedding.weight": torch.randn(10, 16, generator=g), "positional_embedding": torch.randn(77, 16, generator=g),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16, generator=g),
            "ln_final.weight": torch.ones(16), "text_projection": torch.randn(16, 32, generator=g), "logit_scale": torch.tensor(4.6)}
    paths["open_clip"] = str(root / "open_clip_model.bin")
    torch.save({**oc, **text}, paths["open_clip"])

    # OpenAI TorchScript: a traced module whose `.visual` is the open_clip tower
    traced = torch.jit.trace(OpenAIClipLayout(visual).eval(), torch.zeros(1, 3, 224, 224), check_trace=False)
    paths["openai_torchscript"] = str(root / "ViT-tiny.pt")
    torch.jit.save(traced, paths["openai_torchscript"])
    # loaders refuse TorchScript (it runs code); the converter turns it into safetensors on request
    paths["openai_torchscript_converted"] = str(root / "ViT-tiny.safetensors")
    assert convert.main(["--trust-torchscript", paths["openai_torchscript"], "-o", paths["openai_torchscript_converted"]]) == 0
    return paths


def test_hf_folder_equals_transformers(formats, pixels, hf_states):
    """The key conversion (q/k/v -> in_proj, norms, MLP) and our block walk are right."""
    assert_matches_hf(load_clip_image_encoder(formats["hf_folder_safetensors"], expect_width=None), pixels, hf_states)


@pytest.mark.parametrize("fmt", ["hf_folder_bin", "hf_folder_both", "hf_single_prefixed", "hf_single_bare", "open_clip", "openai_torchscript_converted"])
def test_every_format_round_trips(formats, fmt, pixels, hf_states):
    encoder = load_clip_image_encoder(formats[fmt], expect_width=None)
    assert encoder.config.width == 128 and encoder.config.heads == 2 and encoder.config.layers == 24
    assert encoder.config.num_tokens == 257
    assert not any(p.requires_grad for p in encoder.parameters())
    assert_matches_hf(encoder, pixels, hf_states)


def test_sequence_first_transformer_path(formats, pixels, hf_states):
    """open_clip 2.20 (the WebUI pin) has no ``transformer.batch_first`` and runs its blocks
    sequence-first; simulate that and check both code paths agree with HF."""
    encoder = load_clip_image_encoder(formats["hf_folder_safetensors"], expect_width=None)
    with torch.no_grad():
        batch_first_states = encoder(pixels)
    block = encoder.visual.transformer.resblocks[0]
    x = torch.randn(2, 257, 128)
    with torch.no_grad():
        before = block(x)
        del encoder.visual.transformer.batch_first
        for b in encoder.visual.transformer.resblocks:
            b.attn.batch_first = False
        # the patch really changes how blocks read their input (else this test is vacuous)
        assert not torch.allclose(block(x), before, atol=1e-3)
        assert torch.allclose(block(x.transpose(0, 1)).transpose(0, 1), before, atol=1e-5)
        seq_first_states = encoder(pixels)
    for a, b in zip(seq_first_states, batch_first_states):
        assert rel_err(a, b) < REL_TOL
    assert_matches_hf(encoder, pixels, hf_states)


def test_only_needed_blocks_run(formats, pixels):
    """Blocks after the last scale are skipped (they do not change z_1..z_6)."""
    encoder = load_clip_image_encoder(formats["open_clip"], expect_width=None)
    calls = []
    for b in encoder.visual.transformer.resblocks:
        b.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        encoder(pixels[:1])
    assert len(calls) == 24


def test_expect_width_rejects_other_clip(formats):
    with pytest.raises(WeightFileError, match="width 128.*ViT-L/14"):
        load_clip_image_encoder(formats["open_clip"])  # default expects width 1024


def test_non_clip_file_is_named(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "not_clip.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightFileError, match="not_clip.safetensors.*not a CLIP vision checkpoint"):
        load_clip_image_encoder(path, expect_width=None)


def test_incomplete_clip_file_is_named(tmp_path, formats):
    from safetensors.torch import load_file, save_file

    sd = load_file(formats["hf_single_prefixed"])
    del sd["vision_model.encoder.layers.3.mlp.fc1.weight"]
    path = str(tmp_path / "broken_clip.safetensors")
    save_file(sd, path)
    with pytest.raises(WeightFileError, match="broken_clip.safetensors.*(missing|lacks)"):
        load_clip_image_encoder(path, expect_width=None)


def test_gelu_clip_config_is_refused(tmp_path, hf_model):
    """A CLIP with plain GELU (e.g. some non-OpenAI ViTs) is a different network."""
    folder = tmp_path / "gelu"
    hf_model.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightFileError, match="config.json.*quick_gelu"):
        load_clip_image_encoder(str(folder), expect_width=None)
