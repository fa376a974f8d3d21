"""Finding SSR and CLIP-vision weight files, and telling them apart without loading them.

Search folders (webui-host.md, section 2/7): SSR weights in ``models/ssr_encoder/``; CLIP
ViT-L/14 vision weights in ``models/ssr_encoder/``, ``models/clip_vision/`` and
sd-webui-controlnet's ``annotator/downloads/clip_vision/`` when it is installed.

Files are recognised by their keys, read cheaply: the JSON header of a ``.safetensors``
file, or the string constants of the ``data.pkl`` record inside a zip-format torch file
(scanned with ``pickletools``; nothing is unpickled, no code runs). Names are used only
where keys cannot be read (legacy pickles, TorchScript archives). The two files of an
official or re-exported pair are offered as one entry, named after the aligner file; its
partner is found beside it by the loader.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ssr.files import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SSR_PAIRS = (("pytorch_model.bin", "pytorch_model_1.bin"), ("ssr_aligner.safetensors", "ssr_attentions.safetensors"))
HF_CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# ControlNet's CLIP-H / CLIP-G downloads (IP-Adapter): not ViT-L/14, never offered.
NOT_VIT_L = {"clip_h.pth", "clip_g.pth"}
_SSR_LAYER_KEY = re.compile(r"^\d+\.to_[kv]_SSR\.weight$")
_MAX_DEPTH = 3


@dataclass(frozen=True)
class ModelFile:
    """One choice of a dropdown. ``name`` is what users see and send over the API (the path
    relative to the search folder, '/'-separated, CLIP names prefixed with the folder's label);
    ``path`` goes to the loader; ``files`` make up its content (for hashes and cache keys)."""

    name: str
    path: str
    kind: str  # "ssr" or "clip"
    files: Tuple[str, ...]

    def signature(self) -> Tuple:
        """(path, size, mtime) of every file: changes when a file is replaced."""
        out = []
        for f in self.files:
            try:
                st = os.stat(f)
                out.append((f, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((f, -1, -1))
        return tuple(out)


@dataclass
class ModelListing:
    ssr: List[ModelFile] = field(default_factory=list)
    clip: List[ModelFile] = field(default_factory=list)
    ignored: List[Tuple[str, str]] = field(default_factory=list)  # (path, why)
    folders: Dict[str, List[str]] = field(default_factory=dict)

    def names(self, kind: str) -> List[str]:
        return [m.name for m in (self.ssr if kind == "ssr" else self.clip)]

    def why_ignored(self, name: str) -> Optional[Tuple[str, str]]:
        """(path, reason) of an ignored file the user may have meant by ``name``."""
        for path, why in self.ignored:
            if path.replace(os.sep, "/").endswith("/" + name) or os.path.basename(path) == name:
                return path, why
        return None

    def find(self, kind: str, name: str) -> Optional[ModelFile]:
        """By exact name; else by file name alone or name without suffix, if that is unique."""
        entries = self.ssr if kind == "ssr" else self.clip
        for m in entries:
            if m.name == name:
                return m
        loose = [m for m in entries if name in (os.path.basename(m.name), os.path.splitext(os.path.basename(m.name))[0])]
        return loose[0] if len(loose) == 1 else None


# ----------------------------------------------------------------------------- reading keys

def safetensors_keys(path: str) -> Tuple[Set[str], Dict[str, List[int]]]:
    """-> (tensor names, shapes) from a safetensors header only."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length <= 0 or length > min(os.path.getsize(path) - 8, 100 * 1024 * 1024):
            raise ValueError("not a valid safetensors file (truncated download, or another format)")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return set(header), {k: v.get("shape", []) for k, v in header.items() if isinstance(v, dict)}


def torch_zip_strings(path: str, limit: int = 64 * 1024 * 1024) -> Optional[Set[str]]:
    """String constants of a zip-format torch file's pickle record (state-dict keys among
    them), or None for TorchScript archives, legacy pickles and unreadable files."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if any(n.split("/")[1:2] == ["code"] for n in names):
            return None  # TorchScript
        record = [n for n in names if n.endswith("data.pkl")]
        if not record or z.getinfo(record[0]).file_size > limit:
            return None
        data = z.read(record[0])
    strings = set()
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                strings.add(arg)
    except Exception:  # noqa: BLE001 - a damaged record: keys unknown
        return None
    return strings


def kind_from_keys(keys: Iterable[str]) -> str:
    """-> "ssr" (our single file), "ssr-aligner", "ssr-layers", "clip" or "unknown"."""
    keys = set(keys)
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("attention.") for k in keys):
        return "ssr"
    if any(_SSR_LAYER_KEY.match(k) for k in keys):
        return "ssr-layers"
    if "aligner.to_q.weight" in keys or {"to_q.weight", "to_k.weight", "norm.weight"} <= keys:
        return "ssr-aligner"
    for k in keys:
        if k.endswith(("embeddings.patch_embedding.weight", "visual.conv1.weight")) or k == "conv1.weight":
            return "clip"
    return "unknown"


def classify_file(path: str) -> Tuple[str, str]:
    """-> (kind, why) for one weight file."""
    base = os.path.basename(path).lower()
    try:
        if os.path.getsize(path) == 0:
            return "unknown", "empty file"
        if base.endswith(".safetensors"):
            keys, shapes = safetensors_keys(path)
            kind = kind_from_keys(keys)
            if kind == "clip":
                width = next((s[0] for k, s in shapes.items()
                              if k.endswith(("patch_embedding.weight", "conv1.weight")) and s), None)
                if width in (1280, 1664):
                    return "unknown", f"CLIP vision of width {width} (ViT-H/G), SSR-Encoder needs ViT-L/14"
            return kind, "keys"
        strings = torch_zip_strings(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return "unknown", f"unreadable: {e}"
    if strings is not None:
        return kind_from_keys(strings), "keys"
    if "clip" in base or "vit" in base:  # TorchScript (OpenAI's ViT-L-14.pt) or a legacy pickle: go by name
        return "clip", "name"
    return "unknown", "keys not readable (legacy pickle); convert it with python -m ssr.convert"


def hf_clip_folder(folder: str) -> Optional[str]:
    """The weight file of a Hugging Face CLIP (vision) model folder, or None."""
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            model_type = str(json.load(f).get("model_type", ""))
    except (OSError, ValueError):
        return None
    if not model_type.startswith("clip"):
        return None
    return next((os.path.join(folder, n) for n in HF_CLIP_WEIGHTS if os.path.isfile(os.path.join(folder, n))), None)


# ----------------------------------------------------------------------------- listing

def _walk(root: str):
    """-> (folder, file names) under root, at most _MAX_DEPTH levels, hidden entries skipped."""
    root_depth = root.rstrip(os.sep).count(os.sep)
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folder.count(os.sep) - root_depth >= _MAX_DEPTH:
            dirs[:] = []
        yield folder, sorted(f for f in files if not f.startswith("."))


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


class ModelFinder:
    """Lists the weight choices; remembers each file's kind by (path, size, mtime), so a
    refresh only opens new or changed files."""

    def __init__(self):
        self._kinds: Dict[Tuple[str, int, int], Tuple[str, str]] = {}

    def _kind(self, path: str) -> Tuple[str, str]:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._kinds:
            self._kinds[key] = classify_file(path)
        return self._kinds[key]

    def scan(self, ssr_root: str, clip_roots: Sequence[Tuple[str, str]]) -> ModelListing:
        """ssr_root: the SSR folder; clip_roots: (label, folder) pairs, searched in order."""
        listing = ModelListing(folders={"ssr": [ssr_root], "clip": [r for _, r in clip_roots]})
        roots = [("ssr", "", ssr_root)] + [("clip", label, root) for label, root in clip_roots]
        seen: Set[str] = set()
        for wanted, label, root in roots:
            if not os.path.isdir(root):
                continue
            for folder, files in _walk(root):
                hf = hf_clip_folder(folder)
                if hf is not None:
                    if wanted == "clip" and folder not in seen:
                        seen.add(folder)
                        name = f"{label}/{_rel(folder, root)}" if folder != root else f"{label}/{os.path.basename(root)}"
                        listing.clip.append(ModelFile(name, folder, "clip", (hf,)))
                    continue
                self._scan_files(listing, wanted, label, root, folder, files, seen)
        listing.ssr.sort(key=lambda m: m.name.lower())
        return listing

    def _scan_files(self, listing, wanted, label, root, folder, files, seen):
        present = set(files)
        for name in files:
            path = os.path.join(folder, name)
            if not name.lower().endswith(WEIGHT_SUFFIXES) or not os.path.isfile(path) or path in seen:
                continue
            if name.lower() in NOT_VIT_L:
                continue
            kind, why = self._kind(path)
            if wanted == "ssr" and kind in ("ssr", "ssr-aligner"):
                seen.add(path)
                partner = next((os.path.join(folder, b) for a, b in SSR_PAIRS if a == name and b in present), None)
                members = (path,) if kind == "ssr" else ((path, partner) if partner else (path,))
                listing.ssr.append(ModelFile(_rel(path, root), path, "ssr", members))
            elif wanted == "clip" and kind == "clip":
                seen.add(path)
                listing.clip.append(ModelFile(f"{label}/{_rel(path, root)}", path, "clip", (path,)))
            elif kind == "unknown" and wanted == "ssr":
                listing.ignored.append((path, why))
            elif kind == "ssr-layers" and wanted == "ssr" and not any(b == name and a in present for a, b in SSR_PAIRS):
                listing.ignored.append((path, "SSR layer weights without their aligner file beside them "
                                              "(expected pytorch_model.bin or ssr_aligner.safetensors)"))


def content_hash(files: Sequence[str], length: int = 8) -> str:
    """sha256 of one file (the WebUI's short-hash convention), or of the files' sha256 digests
    in order for a pair; first ``length`` hex digits."""
    digests = [file_sha256(path) for path in files]
    if len(digests) == 1:
        return digests[0][:length]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:length]
