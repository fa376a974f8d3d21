"""Loading frozen SD1.x parts from a single-file (WebUI/ldm layout) checkpoint or a diffusers folder.

The reference for every comparison is the original ldm module (ldm package) or the original
transformers model the tiny checkpoint was written from."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_sd  # noqa: E402
from tests import tiny_models as tm  # noqa: E402

from ssr import WeightFileError  # noqa: E402
from trainer.sd_loading import SD15_CONFIG_DIR, load_stable_diffusion, read_configs  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_files")
    return {fmt: tiny_sd.write_ldm_checkpoint(str(folder / fmt), fmt, seed=0) for fmt in ("safetensors", "ckpt")}


def assert_same_as_ldm(parts, original):
    g = torch.Generator().manual_seed(1)
    x, t, context = tm.unet_inputs(2, size=8, context_dim=tiny_sd.CONTEXT_DIM)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    ids = parts.tokenize(["a photo of a dog on the beach", ""])
    with torch.no_grad():
        expected_unet = tm.unet_call(original.unet, x, t, context)
        torch.testing.assert_close(tm.unet_call(parts.unet, x, t, context), expected_unet, rtol=1e-4, atol=1e-5)
        assert expected_unet.abs().mean() > 0.05  # not a vacuous comparison of zeros
        moments = original.vae.moments(image)
        latent = parts.vae.encode(image).latent_dist
        torch.testing.assert_close(latent.mean, moments[:, :4], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(latent.logvar, moments[:, 4:].clamp(-30, 20), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts.vae.decode(z).sample, original.vae.decode(z), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts.text_encoder(input_ids=ids).last_hidden_state,
                                   original.text_encoder(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_checkpoint_matches_the_original_ldm_modules(checkpoints, fmt):
    ck = checkpoints[fmt]
    parts = load_stable_diffusion(ck.path, ck.config_dir)
    assert_same_as_ldm(parts, ck)
    assert parts.source == os.path.basename(ck.path)
    assert all(not p.requires_grad for m in (parts.unet, parts.vae, parts.text_encoder) for p in m.parameters())
    # SD1.x tokenisation: BOS, words, EOS, EOS padding to 77 (CLIP's BPE ids).
    ids = parts.tokenize(["a dog"])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and (ids[0, 3:] == 49407).all()
    assert parts.noise_scheduler.config.prediction_type == "epsilon"


def test_diffusers_folder_loads_the_same_models(checkpoints, tmp_path):
    ck = checkpoints["safetensors"]
    parts = load_stable_diffusion(ck.path, ck.config_dir)
    folder = tmp_path / "diffusers"
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    parts.noise_scheduler.save_pretrained(folder / "scheduler")
    loaded = load_stable_diffusion(str(folder))
    assert_same_as_ldm(loaded, ck)
    assert loaded.tokenize(["a dog"]).tolist() == parts.tokenize(["a dog"]).tolist()


def test_shipped_sd15_configs_describe_sd15():
    configs = read_configs(SD15_CONFIG_DIR)
    assert configs["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert configs["unet"]["cross_attention_dim"] == 768
    assert configs["vae"]["scaling_factor"] == 0.18215
    assert configs["text_encoder"]["hidden_size"] == 768 and configs["text_encoder"]["num_hidden_layers"] == 12
    assert configs["scheduler"]["beta_schedule"] == "scaled_linear"


def test_bad_checkpoints_fail_with_a_message_naming_the_file(tmp_path, checkpoints):
    from safetensors.torch import save_file

    sd2 = tmp_path / "sd2.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), "cond_stage_model.model.token_embedding.weight": torch.zeros(1)}, sd2)
    with pytest.raises(WeightFileError, match=r"sd2\.safetensors.*SD2"):
        load_stable_diffusion(str(sd2))
    vae_only = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, vae_only)
    with pytest.raises(WeightFileError, match=r"vae\.safetensors: no UNet weights"):
        load_stable_diffusion(str(vae_only))
    # The tiny checkpoint against configs of another width: a shape mismatch, explained.
    ck = checkpoints["safetensors"]
    wider = tiny_sd.write_configs(str(tmp_path / "wider"))
    config_path = os.path.join(wider, "unet", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["cross_attention_dim"] = 2 * tiny_sd.CONTEXT_DIM
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(WeightFileError, match=r"tiny-sd1\.safetensors: the UNet weights do not fit.*wrong shapes"):
        load_stable_diffusion(ck.path, wider)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_stable_diffusion(str(tmp_path / "missing.safetensors"))
