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
Resume: ``python -m trainer fit --config <same config> --ckpt_path <run>/checkpoints/last.ckpt``.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Union

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .callbacks import EMA, SampleGrid, SamplesPerSecond, SSRExport
from .data import SubjectDataModule
from .evaluation.training_callback import EvalScores
from .module import SSRTrainingModule


def _seed_value(seed: Union[bool, int, None]) -> int:
    # seed_everything may be true (random seed chosen later): then data/noise use seed 0.
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0


class SSRTrainerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SSRExport, "export")
        parser.add_lightning_class_args(EMA, "ema")
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(SamplesPerSecond, "throughput")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EvalScores, "eval")
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
            self.trainer.loggers = list(self.trainer.loggers) + [CSVLogger(self.trainer.log_dir, name="", version="")]


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
