"""A run's life through the CLI (issue 11 items 2-4): settings on resume, validating a
checkpoint in its stage, one folder per run, stopping on SIGTERM/SIGINT with a checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_sd  # noqa: E402
from test_trainer_cli import files, make_config, read_metrics  # noqa: E402,F401  (files: a fixture)

from trainer.cli import main  # noqa: E402


def jsonl_data(tiny_jsonl):
    return {"train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tiny_jsonl.image_root),
            "val_jsonl": str(tiny_jsonl.jsonl), "val_image_root": str(tiny_jsonl.image_root)}


@pytest.fixture(scope="module")
def two_stage_run(files, tiny_jsonl, tmp_path_factory):
    """2 steps, the first single-scale, checkpoints after each, validation after step 2."""
    out = tmp_path_factory.mktemp("two_stage")
    config = make_config(files, out, jsonl_data(tiny_jsonl), trainer={"max_steps": 2, "val_check_interval": 2},
                         model={"single_scale_steps": 1}, export={"every_n_steps": 0}, samples={"enabled": False},
                         checkpoint={"every_n_train_steps": 1, "save_top_k": -1})
    cli = main(["fit", "--config", config])
    return {"config": config, "out": out, "log_dir": cli.trainer.log_dir,
            "val_loss": float(cli.trainer.callback_metrics["val/loss"])}


def test_validate_uses_the_stage_the_checkpoint_was_trained_in(two_stage_run):
    ckpt = os.path.join(two_stage_run["log_dir"], "checkpoints", "step0000002.ckpt")
    cli = main(["validate", "--config", two_stage_run["config"], "--ckpt_path", ckpt])
    assert cli.model.single_scale() is False  # step 2 of single_scale_steps 1: multi-scale
    assert float(cli.trainer.callback_metrics["val/loss"]) == pytest.approx(two_stage_run["val_loss"], rel=1e-6)
    progress = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ProgressLog")
    assert progress.lines == []  # no training progress lines ("validation at step 0") in validate


def test_resume_keeps_command_line_settings_and_the_checkpoints_for_the_rest(two_stage_run):
    ckpt = os.path.join(two_stage_run["log_dir"], "checkpoints", "step0000001.ckpt")
    with open(two_stage_run["config"]) as f:
        config = yaml.safe_load(f)
    del config["model"]["tau"]  # left out: continues as saved (0.1), not the default
    config["model"]["clip_expect_width"] = None
    path = two_stage_run["out"] / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = os.path.dirname(two_stage_run["log_dir"])
    folders_before = sorted(os.listdir(runs))
    cli = main(["fit", "--config", str(path), "--ckpt_path", ckpt, "--model.learning_rate", "0.0",
                "--trainer.max_steps", "2"])
    assert cli.model.hparams.learning_rate == 0.0
    assert all(group["lr"] == 0.0 for group in cli.trainer.optimizers[0].param_groups)
    assert cli.model.hparams.tau == 0.1 and cli.model.tau == 0.1
    # One run, one folder: the continued run wrote into the checkpoint's version folder,
    # whose metrics.csv keeps the first run's step 0 and gets step 1 anew.
    assert cli.trainer.log_dir == two_stage_run["log_dir"]
    assert sorted(os.listdir(runs)) == folders_before
    steps = [int(r["step"]) for r in read_metrics(cli.trainer.log_dir) if r.get("train/loss")]
    assert steps == [0, 1]  # the first run's step-1 row was replaced, not repeated


@pytest.mark.parametrize("setting,value,words", [
    ("--model.encoder_heads", "2", "and 2 now: it fixes the aligner head count"),
    ("--model.single_scale_steps", "0", "steps already trained would change stage"),
])
def test_resume_refuses_settings_that_cannot_change_mid_run(two_stage_run, capsys, setting, value, words):
    ckpt = os.path.join(two_stage_run["log_dir"], "checkpoints", "step0000002.ckpt")
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", two_stage_run["config"], "--ckpt_path", ckpt, setting, value])
    assert words in str(stopped.value.code)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_resumable_checkpoint_and_exits_non_zero(files, tiny_jsonl, tmp_path, signum):
    config = make_config(files, tmp_path, {"train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tiny_jsonl.image_root)},
                         trainer={"max_steps": 1000}, export={"every_n_steps": 0, "export_on_train_end": False},
                         checkpoint={"every_n_train_steps": 1, "save_last": False, "save_top_k": -1})
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", "--config", config], cwd=tiny_sd.ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "run" / "version_0" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "step0000001.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, output[-3000:]
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert saved["global_step"] >= 1
    # The data position agrees with the step: every step consumed one batch of 2, 14 rows an epoch.
    position = saved["SubjectDataModule"]
    assert position["epoch"] * 14 + position["samples_consumed"] == 2 * saved["global_step"]
    assert f"resume with --ckpt_path {checkpoints / 'last.ckpt'}" in output
