"""Progress a log file can hold (issue 11 item 6): a plain line every N steps, one after each
validation, the skipped samples per reason at the end; the bar counts the run's steps."""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer_cli import files, make_config  # noqa: E402,F401  (files: a fixture)

from trainer.cli import main  # noqa: E402
from trainer.progress import ProgressLog, StepProgressBar  # noqa: E402

LINE = re.compile(r"^step (\d+)/3 \((\d+\.\d)%\) \| \d+\.\d\d samples/s \| loss \d+\.\d{4} \(ldm \d+\.\d{4}, "
                  r"reg \d+\.\d{4}\) \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")


def test_progress_lines_bar_and_skip_summary(files, tiny_jsonl, tmp_path):
    config = make_config(files, tmp_path, {"train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tiny_jsonl.image_root),
                                           "val_jsonl": str(tiny_jsonl.jsonl), "val_image_root": str(tiny_jsonl.image_root)},
                         trainer={"max_steps": 3, "val_check_interval": 2, "enable_progress_bar": True},
                         export={"every_n_steps": 0}, samples={"enabled": False})
    cli = main(["fit", "--config", config, "--progress.every_n_steps", "1", "--progress.bar", "true"])
    progress = next(c for c in cli.trainer.callbacks if isinstance(c, ProgressLog))
    steps = [LINE.match(line) for line in progress.lines if line.startswith("step ")]
    assert all(steps) and [int(m.group(1)) for m in steps] == [1, 2, 3], progress.lines
    assert [m.group(2) for m in steps] == ["33.3", "66.7", "100.0"]
    assert any(re.match(r"^validation at step 2: val/loss \d+\.\d{4}, val/loss_ldm", line) for line in progress.lines)
    # 6 training samples read from the tiny file: its bad rows are counted per reason.
    skipped = cli.datamodule.skipped
    expected = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    assert progress.lines[-2] == f"skipped training samples: {expected} ({sum(skipped.values())} in all)"
    assert progress.lines[-1].startswith("skipped validation samples: ")
    # The bar counted optimizer steps over the run.
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    assert bar.train_progress_bar.total == 3 and bar.train_progress_bar.n == 3


def test_no_bar_in_a_log_file(files, tiny_jsonl, tmp_path):
    """Under pytest stderr is not a terminal, as in a SLURM or nohup log."""
    config = make_config(files, tmp_path, {"train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tiny_jsonl.image_root)},
                         trainer={"max_steps": 1, "enable_progress_bar": True}, export={"every_n_steps": 0},
                         samples={"enabled": False})
    cli = main(["fit", "--config", config])
    assert cli.trainer.progress_bar_callback is None
