"""Reading tensor files safely: safetensors, and zip/pickle checkpoints without executing code.

Every error names the file and says what was expected, because users pick these files from
a dropdown and need to know which one is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Dict, Tuple

import torch


class WeightFileError(ValueError):
    """A weight file is missing, unreadable, truncated or of the wrong kind."""


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise WeightFileError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise WeightFileError(f"{path}: file is empty (0 bytes); re-download it")


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """-> (tensors on CPU, metadata). Raises WeightFileError for truncated/invalid files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_exists(path)
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or header_len > os.path.getsize(path) - 8:
                raise WeightFileError(
                    f"{path}: not a valid safetensors file (header length {header_len} does not fit the "
                    f"{os.path.getsize(path)}-byte file; truncated download or another format)")
            header = json.loads(f.read(header_len))
        metadata = dict(header.get("__metadata__") or {})
        return load_file(path, device="cpu"), metadata
    except WeightFileError:
        raise
    except (SafetensorError, ValueError, UnicodeDecodeError, OSError) as e:
        raise WeightFileError(f"{path}: cannot read as safetensors ({e}); the file is truncated or not safetensors") from e


def is_torchscript_archive(path: str) -> bool:
    """TorchScript archives (e.g. OpenAI's ViT-L-14.pt) are zips with a code/ folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/")[1:2] == ["code"] for n in z.namelist())


def read_torch_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """A .bin/.pt/.pth/.ckpt state dict loaded with ``weights_only=True`` (no code runs).

    TorchScript archives are loaded with ``torch.jit.load`` (their code is TorchScript, not
    pickled Python) and reduced to their state dict. A ``{"state_dict": ...}`` wrapper is
    unwrapped.
    """
    _check_exists(path)
    if is_torchscript_archive(path):
        try:
            return {k: v.detach() for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
        except Exception as e:  # noqa: BLE001 - any failure here is a bad file
            raise WeightFileError(f"{path}: cannot load TorchScript archive ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and unpickler errors all mean "bad file"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if msg.startswith("Weights only load failed"):  # torch's text advises the unsafe weights_only=False
            text = str(e)
            if "WeightsUnpickler error:" in text:  # torch 2.1 names the refused object after this
                refused = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[:1]
            else:  # newer torch names it on a "GLOBAL" line
                refused = [line.strip() for line in text.splitlines() if "GLOBAL" in line][:1]
            msg = "it holds pickled objects other than tensors" + (f": {refused[0]}" if refused else "")
        raise WeightFileError(
            f"{path}: cannot load as a PyTorch weight file ({msg}). It is truncated, not a weight "
            "file, or contains pickled code, which is refused for safety; prefer .safetensors") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFileError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def read_state_dict(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Any supported weight file -> (tensors, metadata). The format is recognised from the
    file's bytes, not its name: safetensors start with a little-endian header length and a
    JSON header; torch files are zips (or legacy pickles)."""
    _check_exists(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return read_safetensors(path)
    return read_torch_checkpoint(path), {}


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (model hashes, cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
