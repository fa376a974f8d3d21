"""Checks of a run's configuration that need no model: run before any model is loaded, so a
wrong path or template stops the command in seconds, with every problem named at once,
instead of after minutes of loading (or at the first validation, hours in).

``problems(config, subcommand)`` -> a list of messages (empty: nothing found). ``config`` is
the subcommand's configuration as a plain dict (``model``, ``data``, ``export``,
``samples``, ``trainer`` sections).
"""
from __future__ import annotations

import os
import string
from typing import Any, Dict, List, Optional

from .jsonl_dataset import JsonlImageTextDataset, unusable_rows_message
from .skips import MAX_CONSECUTIVE_SKIPS, SkipSample
from .webdataset_stream import expand_shards

# What SampleGrid fills into samples.prompts.
PROMPT_FIELDS = ("caption", "query")


def _path_problem(setting: str, path: Optional[str], kind: str) -> Optional[str]:
    """kind: "file", "folder" or "any"."""
    if not path:
        return None
    exists = {"file": os.path.isfile, "folder": os.path.isdir, "any": os.path.exists}[kind](path)
    if exists:
        return None
    if os.path.exists(path):
        return f"{setting}: {path} is not a {kind}"
    return f"{setting}: {path} does not exist (relative paths are taken from {os.getcwd()})"


def prompt_template_problem(index: int, template: str) -> Optional[str]:
    """A samples.prompts entry that str.format with caption/query would reject."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        return f"samples.prompts[{index}] {template!r}: {exc} (write literal braces as {{{{ and }}}})"
    unknown = sorted({f for f in fields if f.split(".")[0].split("[")[0] not in PROMPT_FIELDS})
    if "" in fields or unknown:
        names = ", ".join("{" + f + "}" for f in unknown) if unknown else "{}"
        return (f"samples.prompts[{index}] {template!r} uses {names}; only "
                + " and ".join("{" + f + "}" for f in PROMPT_FIELDS) + " are filled in")
    return None


def _writable_problem(setting: str, folder: str) -> Optional[str]:
    """The folder, or the nearest part of it that exists (it will be created), must be writable."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{setting}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{setting}: cannot write to {existing}"
    return None


def _jsonl_problem(setting: str, jsonl: str, image_root: Optional[str], what: str) -> Optional[str]:
    """The file must have a usable row among its first rows (a wrong image_root or an empty
    validation file shows here)."""
    try:
        dataset = JsonlImageTextDataset(jsonl, image_root, transform=None, seed=0, max_image_pixels=1 << 62)
    except (FileNotFoundError, ValueError) as exc:
        return f"{setting}: {exc}"
    skips: List[SkipSample] = []
    for row in range(min(MAX_CONSECUTIVE_SKIPS, len(dataset))):
        try:
            dataset.read_row(row)
            return None
        except SkipSample as skip:
            skips.append(skip)
    return f"{setting} ({what}): {unusable_rows_message(dataset, 0, skips)}"


def _run_folder(config: Dict[str, Any]) -> str:
    """Where the run folder will be made: the first logger's save_dir, else default_root_dir."""
    trainer = config.get("trainer") or {}
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and (logger.get("init_args") or {}).get("save_dir"):
            return str(logger["init_args"]["save_dir"])
    return str(trainer.get("default_root_dir") or os.getcwd())


def _precomputed_problem(data: Dict[str, Any]) -> Optional[str]:
    """Shards that exist, with a finished precompute.json matching the data resolutions."""
    from .precomputed_reader import precomputed_manifest

    try:
        precomputed_manifest(expand_shards(data["train_precomputed"]), int(data.get("resolution") or 512),
                             int(data.get("clip_resolution") or 224))
    except (FileNotFoundError, ValueError) as exc:
        return f"data.train_precomputed: {exc}"
    return None


def problems(config: Dict[str, Any], subcommand: str) -> List[str]:
    model, data = config.get("model") or {}, config.get("data") or {}
    found: List[Optional[str]] = [
        _path_problem("model.pretrained_model", model.get("pretrained_model"), "any"),
        _path_problem("model.clip_vision", model.get("clip_vision"), "any"),
        _path_problem("model.sd_config_dir", model.get("sd_config_dir"), "folder"),
        # Read also when resuming: the module is built from it before the checkpoint loads.
        _path_problem("model.init_weights", model.get("init_weights"), "any"),
    ]
    found.append(_path_problem("data.image_root", data.get("image_root"), "folder"))
    found.append(_path_problem("data.val_image_root", data.get("val_image_root"), "folder"))
    if subcommand == "fit" and data.get("train_jsonl"):
        found.append(_jsonl_problem("data.train_jsonl", data["train_jsonl"], data.get("image_root"), "training data"))
    if data.get("val_jsonl"):
        found.append(_jsonl_problem("data.val_jsonl", data["val_jsonl"], data.get("val_image_root") or data.get("image_root"),
                                    "validation data"))
    elif subcommand == "validate" and not data.get("val_shards"):
        found.append("validate needs validation data: set data.val_jsonl or data.val_shards")
    for setting in ("train_shards", "val_shards") if subcommand == "fit" else ("val_shards",):
        if data.get(setting):
            try:
                expand_shards(data[setting])
            except (FileNotFoundError, ValueError) as exc:
                found.append(f"data.{setting}: {exc}")
    if subcommand == "fit" and data.get("train_precomputed"):
        found.append(_precomputed_problem(data))
    samples = config.get("samples") or {}
    if samples.get("enabled", True):
        found += [prompt_template_problem(i, t) for i, t in enumerate(samples.get("prompts") or [])]
    if subcommand == "fit":
        export = config.get("export") or {}
        found.append(_writable_problem("export.dirpath" if export.get("dirpath") else "run folder (logger save_dir)",
                                       export.get("dirpath") or _run_folder(config)))
    return [p for p in found if p]
