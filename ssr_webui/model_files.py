"""Finding SSR and CLIP-vision weight files, and telling them apart without loading them.

Search folders (docs/webui-host-notes.md, sections 2 and 7): SSR weights in
``models/ssr_encoder/``; CLIP ViT-L/14 vision weights in ``models/ssr_encoder/``,
``models/clip_vision/`` and sd-webui-controlnet's ``annotator/downloads/clip_vision/`` when
it is installed.

Files are recognised by their content only, never by their names: the tensor names and
shapes of each file, read cheaply by ``ssr.files.read_tensor_headers`` (the JSON header of
a ``.safetensors`` file; the pickle record of a torch file, read by an unpickler that
resolves nothing but inert stand-ins, without touching the tensor data). That also finds
truncated files, TorchScript archives (refused: loading one runs code) and weights for
another model family, which are listed under ``ignored`` with the reason instead of being
offered. The two files of an official or re-exported pair are offered as one entry, named
after the aligner file; its partner is found beside it by the loader.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ssr.clip_checkpoints import detect_clip_layout, hf_weight_file
from ssr.files import WeightFileError, file_sha256, read_tensor_headers
from ssr.layers import FAMILIES
from ssr.weights import (ALIGNER_NAMES, LAYER_NAMES, OFFICIAL_LAYER_KEY, family_problem, file_kind, find_partner,
                         layer_count_problem, pair_mismatch)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
NOT_VIT_L_WIDTHS = {1280: "ViT-H", 1664: "ViT-bigG"}  # IP-Adapter's CLIP-H / CLIP-G
_SSR_KINDS = {"single": "ssr", "aligner": "ssr-aligner", "layers": "ssr-layers"}  # ssr.weights.file_kind -> ours
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
    roots: List[Tuple[str, str]] = field(default_factory=list)  # (label, folder) searched

    def display(self, path: str) -> str:
        """``path`` as users may see it: '<folder label>/<path inside it>' ('/'-separated),
        never the absolute server path (the file name alone if it lies in no search folder)."""
        full = os.path.abspath(path)
        best = None
        for label, root in self.roots:
            root = os.path.abspath(root)
            if full == root or full.startswith(root.rstrip(os.sep) + os.sep):
                if best is None or len(root) > len(best[1]):
                    best = (label, root)
        if best is None:
            return os.path.basename(full)
        rel = os.path.relpath(full, best[1]).replace(os.sep, "/")
        return best[0] if rel == "." else f"{best[0]}/{rel}"

    def scrub(self, text: str) -> str:
        """``text`` with every search folder's absolute path replaced by its label."""
        for label, root in sorted(self.roots, key=lambda r: -len(r[1])):
            for form in {root, os.path.abspath(root)}:
                text = text.replace(form.rstrip(os.sep) + os.sep, label + "/").replace(form, label)
        return text

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

def kind_from_keys(keys: Iterable[str]) -> str:
    """-> "ssr" (our single file), "ssr-aligner", "ssr-layers", "clip" or "unknown": the SSR
    kinds as the SSR loader tells them (``ssr.weights.file_kind``), CLIP vision as the CLIP
    loader does (``ssr.clip_checkpoints.detect_clip_layout``)."""
    keys = set(keys)
    kind = file_kind(keys)
    if kind in _SSR_KINDS:
        return _SSR_KINDS[kind]
    return "clip" if detect_clip_layout(keys)[0] != "unknown" else "unknown"


@dataclass(frozen=True)
class FileInfo:
    """What a weight file holds: ``kind`` (see ``kind_from_keys``; "unknown" for anything
    unusable), ``why`` ("keys" or the reason it cannot be used), and the text-context width
    of SSR weights (to pair halves)."""

    kind: str
    why: str
    context_dim: Optional[int] = None


def _first(shapes: Dict[str, Tuple[int, ...]], pattern) -> Optional[Tuple[int, ...]]:
    for k in sorted(shapes):
        if (pattern.match(k) if hasattr(pattern, "match") else k == pattern) and len(shapes[k]) == 2:
            return tuple(shapes[k])
    return None


_SINGLE_LAYER_KEY = re.compile(r"^attention\.\d+\.to_k\.weight$")


def _shape_problem(kind: str, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[Optional[str], Optional[int]]:
    """-> (why the file cannot be used or None, its text-context width for SSR kinds)."""
    if kind == "clip":
        width = next((s[0] for k, s in shapes.items()
                      if k.endswith(("patch_embedding.weight", "conv1.weight")) and s), None)
        if width in NOT_VIT_L_WIDTHS:
            return f"CLIP vision of width {width} ({NOT_VIT_L_WIDTHS[width]}); SSR-Encoder needs ViT-L/14", None
        return None, None
    if kind == "ssr":
        q, k = _first(shapes, "encoder.to_q.weight"), _first(shapes, _SINGLE_LAYER_KEY)
        if q is None or k is None:
            return "incomplete SSR weights (no encoder.to_q or attention layer tensors)", None
        problem = family_problem(q[1], allow_unknown=True) or family_problem(k[1], allow_unknown=True) \
            or pair_mismatch(q[1], k[1], "this file", "this file")
        return problem, q[1]
    if kind == "ssr-aligner":
        q = _first(shapes, "aligner.to_q.weight") or _first(shapes, "to_q.weight")
        if q is None:
            return "incomplete SSR aligner weights (no to_q tensor)", None
        return family_problem(q[1], allow_unknown=True), q[1]
    if kind == "ssr-layers":
        k = _first(shapes, OFFICIAL_LAYER_KEY)
        count = len({key.split(".")[0] for key in shapes if OFFICIAL_LAYER_KEY.match(key)})
        problem = family_problem(k[1], allow_unknown=True)
        if problem is None and FAMILIES.get(k[1]) == "sd1":
            problem = layer_count_problem(count)
        return problem, k[1]
    return None, None


def inspect_file(path: str) -> FileInfo:
    """Kind, usability and context width of one weight file, from its headers only."""
    try:
        shapes, _ = read_tensor_headers(path)
    except WeightFileError as e:
        text = str(e)
        return FileInfo("unknown", text[len(path) + 2:] if text.startswith(path + ": ") else text)
    except OSError as e:
        return FileInfo("unknown", f"unreadable: {e.strerror or type(e).__name__}")
    kind = kind_from_keys(shapes)
    if kind == "unknown":
        return FileInfo("unknown", "neither SSR-Encoder nor CLIP vision weights (tensor names not recognised)")
    problem, context_dim = _shape_problem(kind, shapes)
    if problem:
        return FileInfo("unknown", problem)
    return FileInfo(kind, "keys", context_dim)


def classify_file(path: str) -> Tuple[str, str]:
    """-> (kind, why) for one weight file."""
    info = inspect_file(path)
    return info.kind, info.why


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
    return hf_weight_file(folder)


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
    """Lists the weight choices; remembers what each file holds by (path, size, mtime), so a
    refresh only opens new or changed files."""

    def __init__(self):
        self._infos: Dict[Tuple[str, int, int], FileInfo] = {}

    def _info(self, path: str) -> FileInfo:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._infos:
            self._infos[key] = inspect_file(path)
        return self._infos[key]

    def scan(self, ssr_root: str, clip_roots: Sequence[Tuple[str, str]]) -> ModelListing:
        """ssr_root: the SSR folder; clip_roots: (label, folder) pairs, searched in order."""
        listing = ModelListing(folders={"ssr": [ssr_root], "clip": [r for _, r in clip_roots]},
                               roots=[(os.path.basename(os.path.normpath(ssr_root)), ssr_root)] + list(clip_roots))
        roots = [("ssr", "", ssr_root)] + [("clip", label, root) for label, root in clip_roots]
        seen: Set[str] = set()
        ignored: Dict[str, str] = {}
        for wanted, label, root in roots:
            if not os.path.isdir(root):
                continue
            for folder, files in _walk(root):
                hf = hf_clip_folder(folder)
                if hf is not None:
                    if wanted == "clip" and folder not in seen:
                        seen.add(folder)
                        info = self._info(hf)
                        if info.kind != "clip":
                            ignored.setdefault(hf, info.why if info.kind == "unknown" else "not CLIP vision weights")
                            continue
                        name = f"{label}/{_rel(folder, root)}" if folder != root else f"{label}/{os.path.basename(root)}"
                        listing.clip.append(ModelFile(name, folder, "clip", (hf,)))
                    continue
                self._scan_files(listing, ignored, wanted, label, root, folder, files, seen)
        listing.ssr.sort(key=lambda m: m.name.lower())
        listing.ignored = list(ignored.items())
        return listing

    def _scan_files(self, listing, ignored, wanted, label, root, folder, files, seen):
        aligners_here = [n for n in files if n.lower().endswith(WEIGHT_SUFFIXES) and
                         self._safe_kind(os.path.join(folder, n)) == "ssr-aligner"]
        for name in files:
            path = os.path.join(folder, name)
            if not name.lower().endswith(WEIGHT_SUFFIXES) or not os.path.isfile(path) or path in seen:
                continue
            info = self._info(path)
            if info.kind == "unknown":
                ignored.setdefault(path, info.why)
            elif wanted == "clip" and info.kind == "clip":
                seen.add(path)
                listing.clip.append(ModelFile(f"{label}/{_rel(path, root)}", path, "clip", (path,)))
            elif wanted == "ssr" and info.kind == "ssr":
                seen.add(path)
                listing.ssr.append(ModelFile(_rel(path, root), path, "ssr", (path,)))
            elif wanted == "ssr" and info.kind == "ssr-aligner":
                seen.add(path)
                partner = find_partner(path, "aligner")
                why = self._pair_problem(path, info, partner)
                if why:
                    ignored.setdefault(path, why)
                else:
                    listing.ssr.append(ModelFile(_rel(path, root), path, "ssr", (path, partner)))
            elif wanted == "ssr" and info.kind == "ssr-layers" and not aligners_here:
                aligner = find_partner(path, "layers")
                if aligner is not None:
                    why = f"its aligner file {os.path.basename(aligner)} beside it cannot be used (see that file)"
                else:
                    why = ("SSR layer weights without their aligner file beside them "
                           f"(expected {' or '.join(ALIGNER_NAMES)})")
                ignored.setdefault(path, why)

    def _safe_kind(self, path: str) -> str:
        try:
            return self._info(path).kind if os.path.isfile(path) else "missing"
        except OSError:
            return "missing"

    def _pair_problem(self, path: str, info: FileInfo, partner: Optional[str]) -> Optional[str]:
        if partner is None:
            return ("SSR aligner weights without their layer weights beside them "
                    f"(expected {' or '.join(LAYER_NAMES)})")
        other = self._info(partner)
        partner_name = os.path.basename(partner)
        if other.kind == "unknown":
            return f"its layer weights {partner_name}: {other.why}"
        if other.kind != "ssr-layers":
            return f"{partner_name} beside it is not SSR layer weights"
        if info.context_dim is not None and other.context_dim is not None:
            return pair_mismatch(info.context_dim, other.context_dim, os.path.basename(path), partner_name)
        return None


def content_hash(files: Sequence[str], length: int = 8) -> str:
    """sha256 of one file (the WebUI's short-hash convention), or of the files' sha256 digests
    in order for a pair; first ``length`` hex digits."""
    digests = [file_sha256(path) for path in files]
    if len(digests) == 1:
        return digests[0][:length]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:length]
