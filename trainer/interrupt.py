"""Stopping on SIGTERM / SIGINT with a checkpoint to resume from.

A cluster's time limit or preemption sends SIGTERM, Ctrl-C sends SIGINT. ``StopOnSignal``
notes the signal and, at the next optimizer-step boundary (where the weights, optimizer,
EMA and data position agree), saves ``last.ckpt`` in the checkpoint folder and stops the
trainer; the CLI then exits with 128 + the signal number, so schedulers and shells see that
the run did not finish. A second SIGINT stops at once (Python's KeyboardInterrupt).
With several devices the ranks agree on stopping at every step boundary (a one-element
all-reduce), so they save the same step together even if only one rank got the signal.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .callbacks import output_dir

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT")


class StopOnSignal(Callback):
    """Saves a resumable checkpoint and stops training on SIGTERM or SIGINT."""

    def __init__(self, signals: Optional[List[str]] = None) -> None:
        """
        Args:
            signals: Signals that save a checkpoint and stop training (names, e.g. SIGUSR2
                for a scheduler's warning signal); default SIGTERM and SIGINT; [] disables.
        """
        names = DEFAULT_SIGNALS if signals is None else signals
        unknown = [n for n in names if not isinstance(getattr(signal, str(n), None), signal.Signals)]
        if unknown:
            raise ValueError(f"stop_on_signal.signals: unknown signal names {unknown}")
        self.signals = [getattr(signal, n) for n in names]
        self.received: Optional[int] = None  # the signal number, once one arrived
        self.stopped_at_step: Optional[int] = None
        self.checkpoint_path: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    # -- handlers, installed for the training part of fit only

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.received = signum
        print(f"\nReceived {signal.Signals(signum).name}: saving a checkpoint at the next step boundary, then "
              "stopping (Ctrl-C again stops at once)", flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's own handlers (its SIGTERM handler only ends the run at an epoch
        # end, with exit code 0 and no checkpoint).
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # -- stopping

    def _agreed(self, trainer: pl.Trainer) -> bool:
        if trainer.world_size == 1:
            return self.received is not None
        # Every rank calls this at every step boundary: one small collective.
        return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.stopped_at_step is not None:
            return
        # An optimizer step just happened: the accumulation is complete or the epoch ended.
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches
        if not step_done or not self._agreed(trainer):
            return
        if self.received is None:  # another rank got the signal
            self.received = signal.SIGTERM
        path = os.path.join(checkpoint_dir(trainer), "last.ckpt")
        if os.path.islink(path):  # save_last: link points at a step checkpoint, which must stay as it is
            os.unlink(path)
        trainer.save_checkpoint(path)
        self.checkpoint_path, self.stopped_at_step = path, trainer.global_step
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(f"Stopped by {signal.Signals(self.received).name} at step {trainer.global_step}; resume with "
                  f"--ckpt_path {path}", flush=True)

    @property
    def exit_code(self) -> Optional[int]:
        """128 + the signal number when training was stopped by a signal, else None."""
        return None if self.stopped_at_step is None else 128 + int(self.received)


def checkpoint_dir(trainer: pl.Trainer) -> str:
    """The ModelCheckpoint folder (default: <run folder>/checkpoints)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return callback.dirpath
    return output_dir(trainer, "checkpoints")
