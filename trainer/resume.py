"""Continuing a run from a Lightning checkpoint (``--ckpt_path``): which model settings apply,
which may not change, and which run folder the continued run writes to.

Settings: the checkpoint's saved model settings take the place of the defaults; what the
configuration or the command line gives wins over them (a lower learning rate after a
``nan``, a moved model folder). Settings that would make the checkpoint mean something else
are refused (``refused_changes``).

Run folder: a checkpoint inside ``<save_dir>/<name>/version_N/checkpoints/`` continues in
that ``version_N`` folder (logs, checkpoints, exports and samples of one run stay together).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch

# Settings that fix the shapes of the trained tensors, or the noise stream of the run.
FIXED_SETTINGS = {
    "encoder_inner_dim": "the aligner width of the trained weights",
    "encoder_heads": "the aligner head count of the trained weights",
    "seed": "the noise, data order and augmentations of the run (seed_everything)",
}
# Saved by Lightning beside the settings; not settings.
_NOT_SETTINGS = {"_instantiator", "_class_path"}


def checkpoint_contents(path: str) -> Tuple[Dict[str, Any], int]:
    """-> (saved model settings, global step) of a Lightning checkpoint, read with
    ``weights_only`` (no pickled code runs)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    settings = {k: v for k, v in dict(checkpoint.get("hyper_parameters") or {}).items() if k not in _NOT_SETTINGS}
    return settings, int(checkpoint.get("global_step", 0))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def changed_settings(saved: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """{name: (checkpoint value, current value)} for settings both know that differ."""
    return {k: (saved[k], current[k]) for k in sorted(saved) if k in current and not _same(saved[k], current[k])}


def refused_changes(changes: Dict[str, Tuple[Any, Any]], step: int) -> List[str]:
    """Messages for the changes a continued run cannot take (``step``: the checkpoint's)."""
    problems = [f"model.{name} is {old!r} in the checkpoint and {new!r} now: it fixes {FIXED_SETTINGS[name]}"
                for name, (old, new) in changes.items() if name in FIXED_SETTINGS]
    if "single_scale_steps" in changes:
        old, new = changes["single_scale_steps"]
        # Moving the stage boundary is fine while it stays ahead of the steps already
        # trained (e.g. lengthening stage one); otherwise trained steps change stage.
        if min(old, new) < step:
            problems.append(f"model.single_scale_steps is {old} in the checkpoint and {new} now, but the checkpoint "
                            f"is at step {step}: steps already trained would change stage")
    return problems


def run_folder_of(ckpt_path: str) -> Optional[str]:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``), or None."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def continue_in_run_folder(logger_configs: List[Dict[str, Any]], ckpt_path: str) -> Optional[str]:
    """Point the loggers whose folder holds ``ckpt_path``'s run at that run's version.

    ``logger_configs``: the ``init_args`` dicts of the configured loggers (TensorBoard, CSV:
    ``save_dir``, ``name``, ``version``), changed in place. -> the run folder, or None when
    the checkpoint lies outside every logger's folders (the run then gets a new folder)."""
    run = run_folder_of(ckpt_path)
    if run is None:
        return None
    for init_args in logger_configs:
        if init_args.get("version") is not None or "save_dir" not in init_args:
            continue  # a version the configuration names explicitly stays
        name = init_args.get("name")
        name = "lightning_logs" if name is None else name  # the loggers' default name
        experiment = os.path.abspath(os.path.join(str(init_args["save_dir"]), str(name)))
        if os.path.dirname(run) == experiment:
            init_args["version"] = os.path.basename(run)
            return run
    return None


def earlier_metrics(path: str, before_step: int) -> Tuple[List[str], List[Dict[str, str]]]:
    """(header, rows) of a metrics.csv, keeping the rows logged before ``before_step``; the
    later ones belong to the part of the run a resume from an earlier checkpoint replaces.
    ([], []) when there is no such file."""
    import csv

    if not os.path.isfile(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("step") in (None, "") or int(float(r["step"])) < before_step]
        return list(reader.fieldnames or []), rows
