"""Precomputed shards (issue 11 item 7): ``python -m trainer.precompute`` writes exactly the
latents, CLIP views and text embeddings the raw data path computes; it skips bad rows like
training does, resumes after an interruption, and refuses other settings; training from
the shards equals training from the images (same samples, augmentations and loss)."""
import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_sd  # noqa: E402
from tests import tiny_models as tm  # noqa: E402

from ssr.image_encoder import clip_preprocess  # noqa: E402
from trainer.precompute import main as precompute_main  # noqa: E402
from trainer.precomputed_format import MANIFEST_NAME, decode_sample  # noqa: E402
from trainer.precomputed_reader import PrecomputedSampleTransform, collate_precomputed  # noqa: E402
from trainer.samples import SampleTransform, load_rgb_image, sample_rng, sd_view  # noqa: E402
from trainer.sd_loading import load_stable_diffusion  # noqa: E402

RESOLUTION = 64


def shard_samples(folder):
    """{source: decoded record} over every shard in folder."""
    from webdataset.tariterators import tarfile_samples

    out = {}
    for shard in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        for raw in tarfile_samples([{"url": shard}]):
            record = decode_sample(raw)
            out[record["source"]] = record
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_sd.write_ldm_checkpoint(str(tmp_path_factory.mktemp("precompute_sd") / "sd"), "safetensors", seed=0)


def precompute_args(checkpoint, tiny_jsonl, output, *extra):
    return ["--pretrained_model", checkpoint.path, "--sd_config_dir", checkpoint.config_dir,
            "--train_jsonl", str(tiny_jsonl.jsonl), "--image_root", str(tiny_jsonl.image_root),
            "--output", str(output), "--resolution", str(RESOLUTION), "--samples_per_shard", "4",
            "--batch_size", "3", "--progress_every", "0", *extra]


@pytest.fixture(scope="module")
def precomputed(checkpoint, tiny_jsonl, tmp_path_factory):
    output = tmp_path_factory.mktemp("precomputed")
    assert precompute_main(precompute_args(checkpoint, tiny_jsonl, output, "--workers", "0", "--text_embeddings",
                                           "--latent_dtype", "float32")) == 0
    return output


@pytest.fixture(scope="module")
def sd(checkpoint):
    return load_stable_diffusion(checkpoint.path, checkpoint.config_dir)


def test_shards_hold_the_views_and_latents_of_the_raw_path(precomputed, tiny_jsonl, sd, capsys):
    manifest = json.load(open(os.path.join(precomputed, MANIFEST_NAME)))
    assert manifest["complete"] and manifest["shards"] == 4  # 14 rows, 4 per shard
    assert manifest["samples"] == len(tiny_jsonl.valid_rows) and manifest["skipped"] == tiny_jsonl.skips_per_pass
    records = shard_samples(precomputed)
    wanted = {tiny_jsonl.rows[r]["file_name"]: tiny_jsonl.rows[r] for r in tiny_jsonl.valid_rows}
    assert set(records) == set(wanted)
    from ssr.query_encoder import encode_query_tokens

    for name, record in records.items():
        row = wanted[name]
        assert record["caption"] == row["text"].strip() and record["query"] == (row.get("query") or row["text"]).strip()
        image = load_rgb_image(os.path.join(tiny_jsonl.image_root, name), name, 10 ** 8)
        view = sd_view(image, RESOLUTION)
        with torch.no_grad():
            dist = sd.vae.encode(torch.stack([view, view.flip(-1)])).latent_dist
            texts = encode_query_tokens(sd.text_encoder, sd.tokenize([record["caption"], record["query"]]), "cpu")
        torch.testing.assert_close(record["latent_mean"], dist.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(record["latent_std"], dist.std, rtol=1e-4, atol=1e-5)
        assert record["clip_pixels"].dtype == torch.uint8
        from ssr.image_encoder import clip_normalize

        assert torch.equal(clip_normalize(record["clip_pixels"]), clip_preprocess(image)[0])
        torch.testing.assert_close(record["caption_states"].float(), texts[0], rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(record["query_states"].float(), texts[1], rtol=1e-3, atol=2e-3)


def test_reader_gives_the_raw_paths_samples_and_loss(precomputed, tiny_jsonl, sd):
    from trainer.core import SSRTrainingCore

    transform = SampleTransform(RESOLUTION, 224, flip_prob=0.5, prompt_dropout=0.3, subject_dropout=0.3)
    reader = PrecomputedSampleTransform(transform)
    records = shard_samples(precomputed)
    raw, pre = [], []
    for seed, name in enumerate(sorted(records)):
        image = load_rgb_image(os.path.join(tiny_jsonl.image_root, name), name, 10 ** 8)
        record = records[name]
        a = transform(image, record["caption"], record["query"], sample_rng(seed))
        b = reader(record, sample_rng(seed))
        assert (a["prompt"], a["query"], a["subject_dropped"]) == (b["prompt"], b["query"], b["subject_dropped"])
        assert torch.equal(a["clip_pixel_values"], b["clip_pixel_values"])
        a["key"] = b["key"] = name
        raw.append(a)
        pre.append(b)
    flips = [not torch.equal(b["latent_mean"], records[n]["latent_mean"][0]) for b, n in zip(pre, sorted(records))]
    assert any(flips) and not all(flips)  # both views are used
    from trainer.samples import collate_samples

    clip = tm.tiny_clip_image_encoder(3, width=tiny_sd.CLIP_WIDTH, layers=tiny_sd.CLIP_LAYERS, heads=tiny_sd.CLIP_HEADS)
    weights = tm.tiny_ssr_weights(4, context_dim=tiny_sd.CONTEXT_DIM, image_dim=tiny_sd.CLIP_WIDTH)
    core = SSRTrainingCore(sd, clip, weights)
    raw_batch, pre_batch = collate_samples(raw[:4]), collate_precomputed(pre[:4])
    assert "pixel_values" not in pre_batch and pre_batch["prompt_states"].shape == (4, 77, tiny_sd.CONTEXT_DIM)
    with torch.no_grad():
        expected = core.losses(raw_batch, torch.Generator().manual_seed(1))
        with_states = core.losses(pre_batch, torch.Generator().manual_seed(1))
        del pre_batch["prompt_states"], pre_batch["query_states"]
        without_states = core.losses(pre_batch, torch.Generator().manual_seed(1))
    for name in ("loss_ldm", "loss_reg"):
        torch.testing.assert_close(without_states[name], expected[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(with_states[name], expected[name], rtol=1e-3, atol=1e-4)  # fp16 text states


def test_interrupted_run_resumes_with_worker_processes_and_refuses_other_settings(checkpoint, tiny_jsonl, tmp_path, capsys):
    output = tmp_path / "out"
    assert precompute_main(precompute_args(checkpoint, tiny_jsonl, output, "--workers", "0")) == 0
    capsys.readouterr()
    kept = {p: os.stat(p).st_mtime_ns for p in (output / "00000.tar", output / "00002.tar")}
    before = shard_samples(output)
    # an interruption: shards 1 and 3 unfinished (one left a partial temporary file)
    for unit in (1, 3):
        os.remove(output / f"0000{unit}.tar")
    (output / "00003.tar.123.tmp").write_bytes(b"partial")
    manifest = json.load(open(output / MANIFEST_NAME))
    json.dump({**manifest, "complete": False}, open(output / MANIFEST_NAME, "w"))

    assert precompute_main(precompute_args(checkpoint, tiny_jsonl, output, "--workers", "2", "--devices", "cpu")) == 0
    out = capsys.readouterr().out
    assert "2 already done, 2 to do with 2 worker process(es)" in out
    assert "precompute: 2/2 shards" in out and "samples/s" in out and "ETA" in out
    assert all(os.stat(p).st_mtime_ns == t for p, t in kept.items())
    after = shard_samples(output)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name]["latent_mean"], before[name]["latent_mean"]), name
    assert json.load(open(output / MANIFEST_NAME))["complete"]

    assert precompute_main(precompute_args(checkpoint, tiny_jsonl, output, "--workers", "0")[:-2] + ["--resolution", "32"]) == 2
    assert "resolution: 64 there, 32 now" in capsys.readouterr().err


def test_fit_from_precomputed_shards_with_a_cosine_schedule(precomputed, checkpoint, tiny_jsonl, tmp_path):
    """Through the CLI: trains from the shards (no image decoded, no VAE run), logs the
    scheduled learning rate, exports the requested formats; a VAE the shards were not made
    with is refused."""
    import csv

    from test_trainer_cli import make_config

    from trainer.cli import main

    clip = tiny_sd.write_clip_vision(str(tmp_path / "clip"))
    files = {"checkpoint": checkpoint, "clip": clip, "released": None}
    config = make_config(files, tmp_path, {"train_precomputed": os.path.join(precomputed, "{00000..00003}.tar"),
                                           "train_samples_per_epoch": 4, "shuffle_buffer": 4},
                         model={"pretrained_model": checkpoint.path, "sd_config_dir": checkpoint.config_dir,
                                "clip_vision": clip, "clip_expect_width": None, "learning_rate": 1e-3,
                                "lr_schedule": "cosine", "lr_warmup_steps": 1, "lr_min_factor": 0.1},
                         trainer={"max_steps": 3}, export={"every_n_steps": 0, "formats": ["single", "official"]})
    cli = main(["fit", "--config", config])
    assert cli.trainer.global_step == 3
    assert cli.datamodule.precomputed_manifest["samples"] == len(tiny_jsonl.valid_rows)
    with open(os.path.join(cli.trainer.log_dir, "metrics.csv")) as f:
        rates = [float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")]
    # step 0 warm-up (1/1), then the cosine over steps 1..3 towards 0.1: 1, 0.55 of 1e-3
    assert rates == pytest.approx([1e-3, 1e-3, 0.55e-3])
    exported = sorted(os.listdir(os.path.join(cli.trainer.log_dir, "export")))
    assert exported == ["ssr-last-official", "ssr-last.safetensors"]

    module = cli.model
    module.trainer.datamodule.precomputed_manifest["vae"] = "vae-000000000000"
    with pytest.raises(ValueError, match="precomputed with another VAE"):
        module._check_precomputed_data()


def test_preflight_names_unusable_precomputed_shards_before_models_load(precomputed, tiny_shards):
    from trainer.preflight import problems

    pattern = os.path.join(precomputed, "{00000..00003}.tar")
    assert problems({"data": {"train_precomputed": pattern, "resolution": RESOLUTION}}, "fit") == []
    found = problems({"data": {"train_precomputed": pattern, "resolution": 512}}, "fit")
    assert len(found) == 1 and "precomputed at resolution 64" in found[0]
    found = problems({"data": {"train_precomputed": tiny_shards.pattern, "resolution": RESOLUTION}}, "fit")
    assert len(found) == 1 and "no precompute.json" in found[0]
    found = problems({"data": {"train_precomputed": os.path.join(precomputed, "{00000..00009}.tar")}}, "fit")
    assert len(found) == 1 and "00004.tar" in found[0]
