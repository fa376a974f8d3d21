"""Command line: ``python -m trainer fit --config trainer/configs/<name>.yaml``.

LightningCLI with the model (``--model.*``, SSRTrainingModule), the data (``--data.*``,
SubjectDataModule), the Lightning Trainer (``--trainer.*``) and these always-present
callbacks, configured at top level:
  --export.*      single-file .safetensors export (SSRExport)
  --ema.*         EMA of the trainable weights (EMA; off unless ema.decay is set)
  --samples.*     validation sample grids (SampleGrid)
  --throughput.*  samples/s in the progress bar (SamplesPerSecond)
  --checkpoint.*  Lightning checkpoints for resume (ModelCheckpoint)
  --eval.*        CLIP-T / CLIP-I / DINO of a fixed eval set every N steps (EvalScores; off by default)
``seed_everything`` also seeds the data order/augmentation and the per-step noise.
Resume: ``python -m trainer fit --config <same config> --ckpt_path <run>/checkpoints/last.ckpt``;
the run continues in its own folder, the checkpoint's model settings stand in for the defaults
and the configuration / command line win over them (trainer/resume.py). SIGTERM and SIGINT
save a checkpoint and exit with 128 + the signal number (trainer/interrupt.py).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Union

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .callbacks import EMA, SampleGrid, SamplesPerSecond, SSRExport
from .data import SubjectDataModule
from .evaluation.training_callback import EvalScores
from .interrupt import StopOnSignal
from .module import SSRTrainingModule
from .preflight import problems as preflight_problems
from .progress import ProgressLog, StepProgressBar
from .resume import changed_settings, checkpoint_contents, continue_in_run_folder, earlier_metrics, refused_changes


def _seed_value(seed: Union[bool, int, None]) -> int:
    # seed_everything may be true (random seed chosen later): then data/noise use seed 0.
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0


def _refuse(message: str) -> None:
    """End the command with ``message`` on stderr and exit code 1 (no traceback: the
    message says what to change)."""
    raise SystemExit(f"error: {message}")


class SSRTrainerCLI(LightningCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._arguments = args  # parsed again with the checkpoint's settings as defaults
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which overwrites every model setting with the
        checkpoint's. Here the checkpoint's settings become the defaults: what the config or
        the command line gives wins, what they leave out continues as saved."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return  # none, or one of Lightning's names it resolves itself later
        if not os.path.isfile(ckpt_path):
            _refuse(f"--ckpt_path {ckpt_path}: no such file")
        saved, step = checkpoint_contents(ckpt_path)
        parser = self._parser(subcommand)
        known = set(self.config[subcommand]["model"].keys())
        linked = {"seed"}  # set from seed_everything (link_arguments), compared below instead
        parser.set_defaults({f"model.{k}": v for k, v in saved.items() if k in known and k not in linked})
        self.config = (self.parser.parse_object(self._arguments) if isinstance(self._arguments, dict)
                       else self.parser.parse_args(self._arguments))
        current = {k: self.config[subcommand]["model"][k] for k in known}
        changes = changed_settings(saved, current)
        problems = refused_changes(changes, step)
        if problems:
            _refuse(f"cannot continue {ckpt_path} with these settings:\n  " + "\n  ".join(problems)
                    + "\nStart a new run (model.init_weights: an exported file) to change them.")
        for name, (old, new) in changes.items():
            print(f"Continuing {os.path.basename(ckpt_path)} (step {step}) with model.{name} = {new!r} "
                  f"(the checkpoint has {old!r})", file=sys.stderr)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.config["subcommand"]]
        if self.config["subcommand"] in ("fit", "validate"):
            # Before any model is loaded (that is what instantiating the classes does).
            found = preflight_problems(config.as_dict(), self.config["subcommand"])
            if found:
                _refuse("the configuration has problems (nothing was loaded yet):\n  " + "\n  ".join(found))
        if self.config["subcommand"] == "fit" and config.get("ckpt_path"):
            loggers = config["trainer"].get("logger")
            loggers = loggers if isinstance(loggers, list) else [loggers]
            init_args = [x.init_args for x in loggers if getattr(x, "init_args", None) is not None]
            run = continue_in_run_folder(init_args, config["ckpt_path"])
            if run is not None:
                print(f"Continuing in the run folder {run}", file=sys.stderr)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SSRExport, "export")
        parser.add_lightning_class_args(EMA, "ema")
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(SamplesPerSecond, "throughput")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EvalScores, "eval")
        parser.add_lightning_class_args(StopOnSignal, "stop_on_signal")
        parser.add_lightning_class_args(ProgressLog, "progress")
        parser.set_defaults({
            "checkpoint.every_n_train_steps": 1000,
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 3,
            "checkpoint.monitor": "step",
            "checkpoint.mode": "max",
            "checkpoint.filename": "step{step:07d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_argument("--csv_log", type=bool, default=True,
                            help="Also write the logged metrics (both loss terms, samples/s, ...) as metrics.csv "
                                 "into the run folder (the first logger's folder, beside checkpoints/, export/, samples/).")
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_seed_value)
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_seed_value)

    def before_fit(self) -> None:
        config = self.config_init["fit"]
        # Resuming never unpickles code from a checkpoint: ours hold only tensors and plain values.
        if config.get("weights_only") is None:
            config["weights_only"] = True
        if config.get("csv_log") and self.trainer.loggers and not any(isinstance(x, CSVLogger) for x in self.trainer.loggers):
            # In the first logger's own folder (not a sibling version folder): one folder per run.
            csv_logger = CSVLogger(self.trainer.log_dir, name="", version="")
            if config.get("ckpt_path") and os.path.isfile(config["ckpt_path"]) and self.trainer.is_global_zero:
                self._keep_earlier_metrics(csv_logger, config["ckpt_path"])
            self.trainer.loggers = list(self.trainer.loggers) + [csv_logger]

    @staticmethod
    def _keep_earlier_metrics(csv_logger: CSVLogger, ckpt_path: str) -> None:
        """A run continued in its folder keeps the metrics.csv rows before the checkpoint's
        step (Lightning's CSV writer deletes an existing file when it starts)."""
        import csv

        _, step = checkpoint_contents(ckpt_path)
        path = os.path.join(csv_logger.log_dir, "metrics.csv")
        header, rows = earlier_metrics(path, step)
        writer = csv_logger.experiment  # created now: this deletes the old file
        if header:
            writer.metrics_keys = sorted(header)
            with open(path, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=writer.metrics_keys)
                out.writeheader()
                out.writerows(rows)

    def _instantiate_trainer(self, config: Dict[str, Any], callbacks: List[Any]):
        # The step bar instead of Lightning's per-epoch bar, and no bar at all in a log file
        # (progress.bar: null), where ProgressLog's lines say the same readably.
        progress = next((c for c in callbacks if isinstance(c, ProgressLog)), None)
        configured = list(callbacks) + list(config.get("callbacks") or [])
        if (progress is not None and config.get("enable_progress_bar") is not False
                and not any(isinstance(c, ProgressBar) for c in configured)):
            if progress.show_bar():
                callbacks = list(callbacks) + [StepProgressBar()]
            else:
                config = {**config, "enable_progress_bar": False}
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        stop = next((c for c in self.trainer.callbacks if isinstance(c, StopOnSignal)), None)
        if stop is not None and stop.exit_code is not None:
            raise SystemExit(stop.exit_code)  # stopped by a signal: the run is not finished


def main(args: Optional[List[str]] = None, run: bool = True) -> SSRTrainerCLI:
    """Run the CLI (``args`` instead of sys.argv, for tests); -> the LightningCLI object."""
    # The frozen models are in eval mode on purpose (SSRTrainingCore.train keeps them there).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # metrics.csv shares the run folder with TensorBoard's files on purpose (see before_fit).
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    return SSRTrainerCLI(
        SSRTrainingModule, SubjectDataModule, args=args, run=run, seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # AdamW of the trainable weights only: SSRTrainingModule.configure_optimizers
        parser_kwargs={"description": "Train SSR-Encoder weights (aligner, subject encoder, subject K/V) "
                                      "for Stable Diffusion 1.x; see docs/training.md."},
    )
