"""End to end through the CLI (``python -m trainer fit``), on tiny models saved in the real
formats: an SD1.x single file in the WebUI layout, a Hugging Face CLIP vision folder, the
official SSR weight pair, and the data module's tiny JSONL / WebDataset fixtures."""
import copy
import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_sd  # noqa: E402
from tests import tiny_models as tm  # noqa: E402

from ssr import load_clip_image_encoder, load_ssr_weights  # noqa: E402
from ssr.weights import official_state_dicts  # noqa: E402
from trainer.cli import main  # noqa: E402
from trainer.sd_loading import load_stable_diffusion  # noqa: E402

ROOT = tiny_sd.ROOT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainer_files")
    checkpoint = tiny_sd.write_ldm_checkpoint(str(folder / "sd"), "safetensors", seed=0)
    clip = tiny_sd.write_clip_vision(str(folder / "clip"))
    released = str(folder / "released")
    os.makedirs(released)
    aligner, layers = official_state_dicts(tm.tiny_ssr_weights(7, context_dim=tiny_sd.CONTEXT_DIM, image_dim=tiny_sd.CLIP_WIDTH))
    torch.save(aligner, os.path.join(released, "pytorch_model.bin"))
    torch.save(layers, os.path.join(released, "pytorch_model_1.bin"))
    return {"checkpoint": checkpoint, "clip": clip, "released": released}


def make_config(files, out_dir, data, **sections):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 3,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "gradient_clip_val": 1.0, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(out_dir),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(out_dir), "name": "run"}}},
        "model": {"pretrained_model": files["checkpoint"].path, "sd_config_dir": files["checkpoint"].config_dir,
                  "clip_vision": files["clip"], "clip_expect_width": None, "init_weights": files["released"],
                  "tau": 0.1, "learning_rate": 1e-3},
        "data": {"batch_size": 2, "num_workers": 0, "resolution": 64, "prompt_dropout": 0.3,
                 "subject_dropout": 0.3, **data},
        "export": {"every_n_steps": 2},
        "samples": {"num_references": 2, "steps": 1},
        "checkpoint": {"every_n_train_steps": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(str(out_dir), "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def read_metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def column(rows, name):
    return [float(r[name]) for r in rows if r.get(name)]


def test_jsonl_run_trains_exports_and_logs(files, tiny_jsonl, tmp_path):
    config = make_config(files, tmp_path, {"train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tiny_jsonl.image_root),
                                           "val_jsonl": str(tiny_jsonl.jsonl), "val_image_root": str(tiny_jsonl.image_root)},
                         trainer={"val_check_interval": 3})
    cli = main(["fit", "--config", config])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 3
    log_dir = trainer.log_dir

    # Both loss terms, every step, finite; validation logged; skipped samples counted.
    rows = read_metrics(log_dir)
    for name in ("train/loss", "train/loss_ldm", "train/loss_reg"):
        values = column(rows, name)
        assert len(values) == 3 and all(math.isfinite(v) for v in values), name
    assert column(rows, "val/loss_ldm") and column(rows, "samples_per_s")
    skipped = sum(cli.datamodule.skipped.values())
    assert skipped > 0 and column(rows, "data/skipped")[-1] == skipped

    # Frozen models are exactly what the files hold; trainable weights moved off the released ones.
    ck = files["checkpoint"]
    fresh = load_stable_diffusion(ck.path, ck.config_dir)
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(fresh, name).state_dict()
        for key, value in getattr(module.core, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key} changed"
    clip = load_clip_image_encoder(files["clip"], expect_width=None).state_dict()
    used = [k for k in clip if not k.startswith("visual.proj")]  # the projection is not in the file, nor used
    assert all(torch.equal(module.core.image_encoder.state_dict()[k], clip[k]) for k in used)
    released = load_ssr_weights(files["released"], expect_family=None).state_dict()
    trained = module.core.ssr.state_dict()
    assert all(not torch.equal(trained[k], released[k]) for k in released)

    # Export -> ssr loader -> the same outputs as the module in memory.
    export_dir = os.path.join(log_dir, "export")
    assert sorted(os.listdir(export_dir)) == ["ssr-last.safetensors", "ssr-step0000002.safetensors"]
    loaded = load_ssr_weights(os.path.join(export_dir, "ssr-last.safetensors"), expect_family=None)
    assert loaded.metadata["base_model"] == "tiny-sd1.safetensors" and loaded.metadata["steps"] == "3"
    assert loaded.metadata["data"] == str(tiny_jsonl.jsonl) and loaded.metadata["regularizer"] == "reference"
    assert loaded.metadata["init_weights"] == "released"
    g = torch.Generator().manual_seed(0)
    z_q = torch.randn(2, 77, tiny_sd.CONTEXT_DIM, generator=g)
    states = [torch.randn(2, 257, tiny_sd.CLIP_WIDTH, generator=g) for _ in range(6)]
    tokens = torch.randn(2, 462, tiny_sd.CONTEXT_DIM, generator=g)
    with torch.no_grad():
        for a, b in zip(loaded.encoder(z_q, states), module.core.ssr.encoder(z_q, states)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for mine, theirs in zip(loaded.attention, module.core.ssr.attention):
            torch.testing.assert_close(mine.to_k(tokens), theirs.to_k(tokens), rtol=0, atol=0)
            torch.testing.assert_close(mine.to_v(tokens), theirs.to_v(tokens), rtol=0, atol=0)

    # A sample grid: 2 references x (reference + 2 prompts), 64 px each.
    from PIL import Image

    with Image.open(os.path.join(log_dir, "samples", "step0000003.png")) as grid:
        assert grid.size == (3 * 64, 2 * 64)
    # Checkpoints hold only the trainable weights.
    state = torch.load(os.path.join(log_dir, "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    assert state and all(k.startswith("core.ssr.") for k in state)


def test_webdataset_run(files, tiny_shards, tmp_path):
    config = make_config(files, tmp_path, {"train_shards": tiny_shards.pattern, "shuffle_buffer": 4},
                         trainer={"max_steps": 2}, model={"init_weights": None, "regularizer": "paper"},
                         export={"every_n_steps": 0})
    cli = main(["fit", "--config", config])
    assert cli.trainer.global_step == 2
    losses = column(read_metrics(cli.trainer.log_dir), "train/loss_reg")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert os.listdir(os.path.join(cli.trainer.log_dir, "export")) == ["ssr-last.safetensors"]


def test_resume_continues_exactly_where_the_run_stopped(files, tiny_jsonl, tmp_path):
    data = {"train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tiny_jsonl.image_root)}
    common = dict(trainer={"max_steps": 4}, ema={"decay": 0.9}, export={"every_n_steps": 0},
                  samples={"enabled": False})
    straight = main(["fit", "--config", make_config(files, tmp_path / "straight", data, **copy.deepcopy(common))])

    first = main(["fit", "--config", make_config(files, tmp_path / "resumed", data, **copy.deepcopy(common)),
                  "--trainer.max_steps", "2"])
    last = os.path.join(first.trainer.log_dir, "checkpoints", "last.ckpt")
    resumed = main(["fit", "--config", make_config(files, tmp_path / "resumed", data, **copy.deepcopy(common)),
                    "--ckpt_path", last])
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    for (name, a), (_, b) in zip(straight.model.core.ssr.state_dict().items(), resumed.model.core.ssr.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    ema_a = next(c for c in straight.trainer.callbacks if type(c).__name__ == "EMA")
    ema_b = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "EMA")
    assert ema_a.updates == ema_b.updates == 4
    for name, value in ema_a.shadow.items():
        torch.testing.assert_close(ema_b.shadow[name], value, rtol=1e-5, atol=1e-7, msg=name)
    opt_a = straight.trainer.optimizers[0].state_dict()["state"]
    opt_b = resumed.trainer.optimizers[0].state_dict()["state"]
    for index, state in opt_a.items():
        assert opt_b[index]["step"] == state["step"]
        torch.testing.assert_close(opt_b[index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_shipped_configs_parse_and_the_tiny_one_runs(tmp_path):
    for name in ("sd15_finetune", "sd15_ddp", "sd15_fsdp"):
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", os.path.join(ROOT, "trainer", "configs", f"{name}.yaml"), "--print_config"])
        assert done.value.code == 0, name
    from trainer.smoke_assets import write_all

    assets = tmp_path / "assets"
    write_all(str(assets))
    with open(os.path.join(ROOT, "trainer", "configs", "tiny_cpu.yaml")) as f:
        config = yaml.safe_load(f)
    text = yaml.safe_dump(config).replace("runs/smoke_assets", str(assets)).replace("runs/smoke", str(tmp_path / "out"))
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    cli = main(["fit", "--config", str(path), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2
    log_dir = cli.trainer.log_dir
    assert log_dir.startswith(str(tmp_path / "out"))
    assert os.path.isfile(os.path.join(log_dir, "export", "ssr-last.safetensors"))
    assert os.path.isfile(os.path.join(log_dir, "samples", "step0000002.png"))


def test_help_explains_the_options():
    result = subprocess.run([sys.executable, "-m", "trainer", "fit", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    for option, words in {
        "--model.pretrained_model": "single-file checkpoint in the WebUI/ldm layout",
        "--model.regularizer": "token-wise mean of 1 - cos",
        "--model.single_scale_steps": "fed the last CLIP scale z_6",
        "--model.cache_latents": "pixel fingerprint",
        "--data.train_shards": "img2dataset",
        "--export.every_n_steps": "Export every",
        "--ema.decay": "disables EMA",
        "--samples.prompts": "{query}",
        "--csv_log": "metrics.csv",
    }.items():
        assert option in text, option
        assert words in text, words


def test_ddp_on_two_cpu_processes(tmp_path):
    """DDP through Lightning's launcher (gloo): two ranks train, validate (sample grid: rank 0
    writes, every rank generates) and export without a deadlock."""
    import signal

    from trainer.smoke_assets import write_all

    assets = tmp_path / "assets"
    write_all(str(assets))
    with open(os.path.join(ROOT, "trainer", "configs", "tiny_cpu.yaml")) as f:
        text = f.read().replace("runs/smoke_assets", str(assets)).replace("runs/smoke", str(tmp_path / "out"))
    config = yaml.safe_load(text)
    config["trainer"].update(strategy="ddp", devices=2, max_steps=2, enable_progress_bar=False)
    config["samples"]["steps"] = 1
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks: a hung collective never returns
        pytest.fail("DDP run did not finish within 300 s (deadlock?)")
    assert proc.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in output
    run = tmp_path / "out" / "tiny_cpu" / "version_0"
    assert (run / "samples" / "step0000002.png").is_file()
    weights = load_ssr_weights(str(run / "export" / "ssr-last.safetensors"), expect_family=None)
    assert weights.metadata["devices"] == "2" and weights.metadata["steps"] == "2"
