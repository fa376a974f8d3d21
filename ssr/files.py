"""Reading tensor files safely: safetensors, and zip/pickle checkpoints without executing code.

Every error names the file and says what was expected, because users pick these files from
a dropdown and need to know which one is wrong.

TorchScript archives (OpenAI's ``ViT-L-14.pt``) are refused: loading one runs code stored
in the file, and on torch < 2.6 ``torch.load(..., weights_only=True)`` hands such a file to
``torch.jit.load`` by itself. They are recognised from their zip directory (a
``constants.pkl`` record or a ``code/`` folder) before anything is loaded; ``python -m
ssr.convert --trust-torchscript`` converts one, once, on purpose.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import zipfile
from typing import Any, Callable, Dict, Tuple

import torch


class WeightFileError(ValueError):
    """A weight file is missing, unreadable, truncated or of the wrong kind."""


class TorchScriptRefused(WeightFileError):
    """The file is a TorchScript archive; loading it would run code stored in it."""


# How users run the converter from the WebUI folder (docs/webui.md, README).
CONVERT_COMMAND = "python extensions/sd-webui-ssr-encoder/convert.py"


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise WeightFileError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise WeightFileError(f"{path}: file is empty (0 bytes); re-download it")


# ----------------------------------------------------------------------------- safetensors

def is_safetensors(path: str) -> bool:
    """Whether the file's bytes start as a safetensors file does: an 8-byte little-endian
    header length, then the JSON header's opening brace (torch files are zips or pickles)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors_header(path: str) -> Dict[str, Any]:
    """The JSON header of a safetensors file (tensor entries and ``__metadata__``), checked
    against the file's size, so a truncated download is found without reading the data."""
    _check_exists(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or header_len > size - 8 or header_len > 100 * 1024 * 1024:
            raise WeightFileError(
                f"{path}: not a valid safetensors file (header length {header_len} does not fit the "
                f"{size}-byte file; truncated download or another format)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{path}: not a valid safetensors file (damaged header: {e}); re-download it") from e
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + header_len + end > size:
        raise WeightFileError(f"{path}: truncated safetensors file ({size} bytes, its header describes "
                              f"{8 + header_len + end}); re-download it")
    return header


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """-> (tensors on CPU, metadata). Raises WeightFileError for truncated/invalid files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    metadata = dict(header.get("__metadata__") or {})
    try:
        return load_file(path, device="cpu"), metadata
    except (SafetensorError, ValueError, UnicodeDecodeError, OSError) as e:
        raise WeightFileError(f"{path}: cannot read as safetensors ({e}); the file is truncated or not safetensors") from e


# ----------------------------------------------------------------------------- TorchScript

def is_torchscript_archive(path: str) -> bool:
    """TorchScript archives (e.g. OpenAI's ViT-L-14.pt) are zips whose record holds
    ``constants.pkl`` and a ``code/`` folder; read from the zip directory only."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    for name in names:
        parts = name.split("/")
        if parts[-1] == "constants.pkl" and len(parts) <= 2 or parts[1:2] == ["code"]:
            return True
    return False


def torchscript_refusal(path: str) -> str:
    """The message for a refused TorchScript file: what it is and how to convert it once."""
    stem = os.path.splitext(os.path.basename(path))[0] or "clip_vision"
    return (f"{path}: this is a TorchScript archive (like OpenAI's ViT-L-14.pt). Loading it runs code stored in "
            f"the file, so it is refused. If you trust where it came from, convert it once: "
            f"{CONVERT_COMMAND} --trust-torchscript \"{path}\" -o models/clip_vision/{stem}.safetensors "
            f"(or use a .safetensors download instead)")


# ----------------------------------------------------------------------------- torch pickles

def _is_webui_safe_load() -> bool:
    """True when ``torch.load`` is not torch's own (the WebUI swaps in its restricted loader,
    which prints an error and returns None for pickles it refuses)."""
    return not str(getattr(torch.load, "__module__", "torch")).startswith("torch")


def read_torch_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """A .bin/.pt/.pth/.ckpt state dict loaded with ``weights_only=True`` (no code runs).

    TorchScript archives are refused (TorchScriptRefused). A ``{"state_dict": ...}``
    wrapper is unwrapped.
    """
    _check_exists(path)
    if is_torchscript_archive(path):
        raise TorchScriptRefused(torchscript_refusal(path))
    try:
        with warnings.catch_warnings():
            # torch 2.1's weights_only unpickler warns "TypedStorage is deprecated" from its own
            # internals for every file; nothing a user can act on.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
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
    if obj is None and _is_webui_safe_load():
        raise WeightFileError(
            f"{path}: the WebUI's safe loader refused this pickle file (it contains objects other than tensors); "
            f"convert it to .safetensors with `{CONVERT_COMMAND} \"{path}\" -o <name>.safetensors` "
            "or download the safetensors version")
    return _state_dict_of(obj, path, torch.Tensor)


def _state_dict_of(obj: Any, path: str, tensor_type: type) -> Dict[str, Any]:
    """The state dict a torch file holds (a ``{"state_dict": ...}`` wrapper unwrapped), whose
    values must all be ``tensor_type``; else a WeightFileError naming the file."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, tensor_type) for v in obj.values()):
        raise WeightFileError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------- headers only

_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name: str):
        self.name, self.itemsize = name, _ITEMSIZE[name]


class _StorageRef:
    def __init__(self, key: str, itemsize: int, numel: int):
        self.key, self.itemsize, self.numel = str(key), itemsize, int(numel)


class _TensorStub:
    """What a tensor record says: shape, and how much of its storage it needs."""

    def __init__(self, storage, offset, size, stride, *_):
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError("tensor without a storage record")
        self.storage, self.shape = storage, tuple(int(s) for s in size)
        extent = 0 if 0 in self.shape else 1 + sum((s - 1) * int(st) for s, st in zip(self.shape, stride))
        self.needed = int(offset) + extent  # elements of the storage


class _Dict(dict):
    """OrderedDict stand-in (state dicts carry a ``_metadata`` attribute)."""


def _encode_latin1(text, encoding="latin1"):
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r}")
    return str(text).encode("latin1")


_GLOBALS = {
    ("collections", "OrderedDict"): _Dict,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorStub,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
    ("_codecs", "encode"): _encode_latin1,
}


class _RefusedObject(pickle.UnpicklingError):
    """The pickle record names a class or function that is not a tensor part."""

    def __init__(self, module: str, name: str):
        self.what = f"{module}.{name}"
        super().__init__(f"holds a pickled {self.what}, not only tensors")


def _refused_object_error(path: str, e: _RefusedObject) -> WeightFileError:
    """What a pickle holding other objects is, and what to do about it."""
    return WeightFileError(
        f"{path}: a PyTorch pickle that holds a {e.what} object besides tensors; such files are refused, "
        "because loading them can run code from the file. Use the .safetensors version of these weights, "
        "or, if you trust the file, load it in Python and save only its tensors with safetensors' save_file")


class _HeaderUnpickler(pickle.Unpickler):
    """Reads a torch pickle record into ``_TensorStub``s: only the names in ``_GLOBALS`` and
    torch's storage type names resolve, all to inert stand-ins defined here, so nothing from
    the file runs and no tensor data is read."""

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in _ITEMSIZE:
            return _StorageType(name)
        raise _RefusedObject(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or not isinstance(pid[1], _StorageType):
            raise pickle.UnpicklingError("unexpected persistent record")
        return _StorageRef(pid[2], pid[1].itemsize, pid[4])


def _zip_headers(path: str) -> Dict[str, Tuple[int, ...]]:
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        record = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
        if not record:
            raise WeightFileError(f"{path}: zip file without a torch data.pkl record; not a PyTorch weight file")
        if infos[record[0]].file_size > 64 * 1024 * 1024:
            raise WeightFileError(f"{path}: its pickle record is larger than 64 MiB; not a plain state dict")
        prefix = record[0][: -len("data.pkl")]
        try:
            stubs = _state_dict_of(_HeaderUnpickler(z.open(record[0])).load(), path, _TensorStub)
        except WeightFileError:
            raise
        except _RefusedObject as e:
            raise _refused_object_error(path, e) from e
        except Exception as e:  # noqa: BLE001 - damaged record
            raise WeightFileError(f"{path}: cannot read its tensor list ({e})") from e
    for key, stub in stubs.items():
        info = infos.get(f"{prefix}data/{stub.storage.key}")
        have = info.file_size if info is not None else -1
        if have < stub.needed * stub.storage.itemsize:
            raise WeightFileError(f"{path}: tensor {key!r} lies outside the stored data (damaged or truncated file); re-download it")
    return {k: v.shape for k, v in stubs.items()}


def _legacy_headers(path: str) -> Dict[str, Tuple[int, ...]]:
    """Legacy (pre-1.6) torch files: magic, protocol, system info, the record, the storage
    keys, then each storage as an 8-byte count plus its bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            if _HeaderUnpickler(f).load() != _LEGACY_MAGIC:
                raise WeightFileError(f"{path}: not a PyTorch weight file (no zip directory, no legacy header); "
                                      "a truncated download, or another format")
            _HeaderUnpickler(f).load(), _HeaderUnpickler(f).load()  # protocol version, system info
            unpickler = _HeaderUnpickler(f)
            storages: Dict[str, _StorageRef] = {}

            def persistent_load(pid, _base=unpickler.persistent_load):
                ref = _base(pid)
                storages.setdefault(ref.key, ref)
                return ref

            unpickler.persistent_load = persistent_load
            stubs = _state_dict_of(unpickler.load(), path, _TensorStub)
            keys = _HeaderUnpickler(f).load()
            start = f.tell()
        except WeightFileError:
            raise
        except _RefusedObject as e:
            raise _refused_object_error(path, e) from e
        except Exception as e:  # noqa: BLE001 - anything unreadable is a bad file
            raise WeightFileError(f"{path}: not a readable PyTorch weight file ({e or type(e).__name__}); "
                                  "a truncated download, or another format") from e
    need = start + sum(8 + storages[k].numel * storages[k].itemsize for k in keys if k in storages)
    if need > size or any(stub.needed > stub.storage.numel for stub in stubs.values()):
        raise WeightFileError(f"{path}: truncated PyTorch weight file ({size} bytes, needs {need}); re-download it")
    return {k: v.shape for k, v in stubs.items()}


def read_tensor_headers(path: str) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """-> (tensor name -> shape, metadata) of any supported weight file without loading its
    tensors: the safetensors JSON header, or a torch file's pickle record read by an
    unpickler that resolves nothing but inert stand-ins. Checks that the data the header
    describes is present (truncated files), and refuses TorchScript and non-tensor pickles
    with a WeightFileError, like the loaders."""
    _check_exists(path)
    if is_safetensors(path):
        header = read_safetensors_header(path)
        metadata = dict(header.pop("__metadata__", None) or {})
        return {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}, metadata
    if zipfile.is_zipfile(path):
        if is_torchscript_archive(path):
            raise TorchScriptRefused(torchscript_refusal(path))
        try:
            return _zip_headers(path), {}
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise WeightFileError(f"{path}: damaged zip file ({e}); re-download it") from e
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise WeightFileError(f"{path}: damaged or truncated zip file (no zip directory at its end); re-download it")
    return _legacy_headers(path), {}


def read_state_dict(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Any supported weight file -> (tensors, metadata). The format is recognised from the
    file's bytes, not its name: safetensors start with a little-endian header length and a
    JSON header; torch files are zips (or legacy pickles)."""
    _check_exists(path)
    if is_safetensors(path):
        return read_safetensors(path)
    return read_torch_checkpoint(path), {}


# ----------------------------------------------------------------------------- writing

def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` sets
    and restores it, which a thread creating a file in between would see)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary_path)``, then give the file the mode a plain ``open`` would (0666
    less the umask) and rename it to ``path``: no half-written file ever has the real name.
    The mode matters because some writers (safetensors >= 0.5) create 0600 files, which
    other users of a shared models folder or a WebUI running as another user cannot read."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (model hashes, cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
