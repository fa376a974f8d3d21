"""SSR-Encoder weights: the trainable parts, and the file formats they come in.

Formats (recognised from the keys, never from file names):
- official pair: ``pytorch_model.bin`` (aligner: ``aligner.to_q.weight``,
  ``aligner.processor.to_v.{k}.weight``, ``norm.*`` ...) + ``pytorch_model_1.bin``
  (``{i}.to_k_SSR.weight`` / ``{i}.to_v_SSR.weight`` for odd i = 1..31),
- safetensors re-export pair: ``ssr_aligner.safetensors`` (``to_q.weight``, ``to_v.{k}.weight``
  ...) + ``ssr_attentions.safetensors`` (same ``{i}.to_k_SSR.weight`` keys),
- our single file: ``encoder.*`` + ``attention.{j}.to_k.weight`` (j = canonical position
  0..15) and metadata (format version, base family, layer widths, source).

All three are read by ``load_ssr_weights`` and written by ``export_ssr_weights`` (the official
pair with ``torch.save`` of plain tensors, readable with ``weights_only`` loading).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .attention import SubjectAttentionWeights
from .files import WeightFileError, read_state_dict, write_atomically
from .layers import FAMILIES, FAMILY_LABELS, SD1_WIDTHS, canonical_position, family_label, official_index
from .subject_encoder import SubjectEncoder, SubjectEncoderConfig

FORMAT_NAME = "ssr-encoder"
FORMAT_VERSION = "1"
DEFAULT_HEADS = 8  # the aligner's head count; not recoverable from the weights
# A layer tensor of the official / re-exported layer-weights file: official index i, k or v.
OFFICIAL_LAYER_KEY = re.compile(r"^(\d+)\.to_([kv])_SSR\.weight$")
# The file names of the two-file releases, (aligner, layer weights): official, safetensors re-export.
PAIR_NAMES = (("pytorch_model.bin", "pytorch_model_1.bin"), ("ssr_aligner.safetensors", "ssr_attentions.safetensors"))
ALIGNER_NAMES = tuple(aligner for aligner, _ in PAIR_NAMES)
LAYER_NAMES = tuple(layers for _, layers in PAIR_NAMES)


class WrongFamilyError(WeightFileError):
    """The weights are not shaped for the expected model family (text width, layer count)."""


class SSRWeights(nn.Module):
    """All trainable SSR-Encoder parts: ``encoder`` (aligner + subject encoder) and
    ``attention`` (K_S/V_S per attn2 layer, canonical order). ``metadata`` travels with it."""

    def __init__(self, encoder_config: SubjectEncoderConfig = SubjectEncoderConfig(),
                 widths: Sequence[int] = SD1_WIDTHS,
                 metadata: Optional[Dict[str, str]] = None):
        super().__init__()
        self.encoder = SubjectEncoder(encoder_config)
        self.attention = SubjectAttentionWeights(widths, encoder_config.text_dim)
        self.metadata: Dict[str, str] = dict(metadata or {})

    @property
    def family(self) -> str:
        return FAMILIES.get(self.attention.context_dim, "unknown")

    def describe(self) -> Dict[str, str]:
        """Metadata written into our single-file format."""
        c = self.encoder.config
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "base": self.family,
            "layers": str(len(self.attention)), "widths": ",".join(map(str, self.attention.widths)),
            "context_dim": str(self.attention.context_dim), "image_dim": str(c.image_dim),
            "inner_dim": str(c.inner_dim), "heads": str(c.heads), "num_scales": str(c.num_scales),
        }


# ------------------------------------------------------------------------ key layouts

def _aligner_from_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith("aligner.processor."):
            out[k[len("aligner.processor."):]] = v
        elif k.startswith("aligner."):
            out[k[len("aligner."):]] = v
        else:
            out[k] = v
    return out


def _attention_from_official(sd: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    out, unexpected = {}, []
    for k, v in sd.items():
        m = OFFICIAL_LAYER_KEY.match(k)
        if not m or int(m.group(1)) % 2 == 0:
            unexpected.append(k)
            continue
        out[f"{canonical_position(int(m.group(1)))}.to_{m.group(2)}.weight"] = v
    if unexpected:
        raise WeightFileError(f"{path}: unexpected keys for SSR layer weights (expected odd '{{i}}.to_k_SSR.weight'): {unexpected[:4]}")
    return out


def file_kind(keys: Iterable[str]) -> str:
    """What an SSR weight file holds, from its tensor names alone: "single" (our file: encoder
    and attention), "layers" (the layer-weights file of a pair), "aligner" (the aligner file of
    a pair, official or re-exported layout) or "unknown"."""
    keys = set(keys)
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("attention.") for k in keys):
        return "single"
    if any(OFFICIAL_LAYER_KEY.match(k) for k in keys):
        return "layers"
    if "aligner.to_q.weight" in keys or {"to_q.weight", "to_k.weight", "norm.weight"} <= keys:
        return "aligner"
    return "unknown"


def _encoder_config(enc: Dict[str, torch.Tensor], heads: int, path: str) -> SubjectEncoderConfig:
    try:
        inner, text_dim = enc["to_q.weight"].shape
        image_dim = enc["to_k.weight"].shape[1]
    except KeyError as e:
        raise WeightFileError(f"{path}: aligner weights lack {e}") from e
    scales = len({k.split(".")[1] for k in enc if k.startswith("to_v.")})
    return SubjectEncoderConfig(text_dim=text_dim, image_dim=image_dim, inner_dim=inner, heads=heads, num_scales=scales)


def _widths(att: Dict[str, torch.Tensor], path: str) -> List[int]:
    positions = sorted({int(k.split(".")[0]) for k in att})
    if positions != list(range(len(positions))):
        missing = sorted(set(range(max(positions) + 1)) - set(positions)) if positions else [0]
        raise WeightFileError(f"{path}: layer weights are missing layers {[official_index(p) for p in missing]} (official numbering)")
    return [att[f"{p}.to_k.weight"].shape[0] if f"{p}.to_k.weight" in att else 0 for p in positions]


def family_problem(context_dim: int, expect_family: Optional[str] = "sd1", allow_unknown: bool = False) -> Optional[str]:
    """Why weights with this text-context width do not fit ``expect_family`` (None: they do).
    ``allow_unknown`` lets widths of no known family pass (tiny test models)."""
    family = FAMILIES.get(int(context_dim), "unknown")
    if expect_family is None or family == expect_family or (family == "unknown" and allow_unknown):
        return None
    needed = FAMILY_LABELS[expect_family]
    if family == "unknown":
        return f"these SSR weights take a {context_dim}-wide text context, which is no SD family's; {needed} weights are needed"
    return f"these SSR weights are for {FAMILY_LABELS[family]}, {context_dim}-wide text context; {needed} weights are needed"


def layer_count_problem(count: int) -> Optional[str]:
    """Why SD1.x SSR weights with ``count`` layers cannot be used (None: they can)."""
    if count == len(SD1_WIDTHS):
        return None
    return f"{count} layers; SD1.x SSR weights have {len(SD1_WIDTHS)} attn2 layers"


def pair_mismatch(text_dim: int, context_dim: int, aligner: str, layers: str) -> Optional[str]:
    """Why an aligner and layer weights do not belong together (None: they may)."""
    if int(text_dim) == int(context_dim):
        return None
    if aligner == layers:
        return (f"{aligner}: its aligner takes a {text_dim}-wide text context but its layer weights a "
                f"{context_dim}-wide one; the file is damaged or not SSR-Encoder weights")
    return (f"{aligner} (aligner, {family_label(text_dim, f'{text_dim}-wide')}) and "
            f"{layers} (layer weights, {family_label(context_dim, f'{context_dim}-wide')}) "
            "are not from the same release: they take different text-context widths")


def _build(enc: Dict[str, torch.Tensor], att: Dict[str, torch.Tensor], heads: int,
           sources: Tuple[str, str], metadata: Dict[str, str], expect_family: Optional[str]) -> SSRWeights:
    if not att:
        raise WeightFileError(f"{sources[1]}: holds no SSR layer weights")
    # The family first: other families' files differ in every shape, and a list of
    # mismatched shapes would hide the one thing the user needs to know.
    text_dim = enc["to_q.weight"].shape[1] if "to_q.weight" in enc and enc["to_q.weight"].ndim == 2 else None
    context_dim = next(iter(att.values())).shape[1]
    for dim, path in ((text_dim, sources[0]), (context_dim, sources[1])):
        problem = family_problem(dim, expect_family) if dim is not None else None
        if problem:
            raise WrongFamilyError(f"{path}: {problem}")
    if text_dim is not None and pair_mismatch(text_dim, context_dim, *sources):
        raise WeightFileError(pair_mismatch(text_dim, context_dim, *sources))
    config = _encoder_config(enc, heads, sources[0])
    widths = _widths(att, sources[1])
    if expect_family == "sd1" and layer_count_problem(len(widths)):
        raise WrongFamilyError(f"{sources[1]}: {layer_count_problem(len(widths))}")
    model = SSRWeights(config, widths, metadata)
    for part, sd, module, path in (("encoder", enc, model.encoder, sources[0]), ("attention", att, model.attention, sources[1])):
        expected = module.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise WeightFileError(f"{path}: {part} weights do not match the SSR layout: "
                                  f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        bad = [f"{k}: {tuple(sd[k].shape)}, expected {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
        if bad:
            raise WeightFileError(f"{path}: wrong tensor shapes in {part} weights: {bad[:3]}")
        module.load_state_dict({k: v.float() for k, v in sd.items()})
    model.metadata.setdefault("source", " + ".join(dict.fromkeys(os.path.basename(s) for s in sources)))
    return model


# ------------------------------------------------------------------------ public API

def find_partner(path: str, kind: str) -> Optional[str]:
    """For one file of a pair (``kind`` "aligner" or "layers"), the other file in the same
    folder: its partner by name, else any file there with a known name of the other half."""
    folder = os.path.dirname(path)
    here = os.path.basename(path)
    pairs = [pair if kind == "aligner" else pair[::-1] for pair in PAIR_NAMES]  # (this half, the other)
    for own, other in pairs:
        if here == own and os.path.isfile(os.path.join(folder, other)):
            return os.path.join(folder, other)
    for _, other in pairs:  # any known partner name, if the file was renamed
        candidate = os.path.join(folder, other)
        if os.path.isfile(candidate) and os.path.abspath(candidate) != os.path.abspath(path):
            return candidate
    return None


def load_ssr_weights(source: Union[str, Sequence[str]], expect_family: Optional[str] = "sd1") -> SSRWeights:
    """Load SSR weights from our single file, a folder holding a pair, one file of a pair
    (its partner is found beside it), or an explicit (aligner, layers) pair of paths.
    Raises WeightFileError naming the file for anything missing, mismatched or truncated."""
    if isinstance(source, (list, tuple)):
        paths = list(source)
    elif os.path.isdir(source):
        paths = [os.path.join(source, n) for pair in PAIR_NAMES for n in pair if os.path.isfile(os.path.join(source, n))][:2]
        if len(paths) != 2:
            pairs = " or ".join(" + ".join(pair) for pair in PAIR_NAMES)
            raise WeightFileError(f"{source}: folder holds no SSR weight pair ({pairs})")
    else:
        paths = [source]

    loaded = {}
    for path in paths:
        sd, meta = read_state_dict(path)
        kind = file_kind(sd)
        if kind == "unknown":
            raise WeightFileError(f"{path}: not an SSR-Encoder weight file (first keys: {sorted(sd)[:4]})")
        if kind in loaded:
            raise WeightFileError(f"{path}: two {kind} files given ({loaded[kind][0]} and {path})")
        loaded[kind] = (path, sd, meta)
        if kind in ("aligner", "layers") and len(paths) == 1:
            partner = find_partner(path, kind)
            if partner is None:
                need = f"layer weights ({' / '.join(LAYER_NAMES)})" if kind == "aligner" \
                    else f"aligner weights ({' / '.join(ALIGNER_NAMES)})"
                raise WeightFileError(f"{path}: holds only the {kind} half of SSR weights; put its {need} beside it")
            paths.append(partner)

    if "single" in loaded:
        path, sd, meta = loaded["single"]
        if meta.get("format", FORMAT_NAME) != FORMAT_NAME or int(meta.get("format_version", FORMAT_VERSION)) > int(FORMAT_VERSION):
            raise WeightFileError(f"{path}: format {meta.get('format')} v{meta.get('format_version')} is newer than this "
                                  f"extension supports (v{FORMAT_VERSION}); update the extension")
        enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        att = {k[len("attention."):]: v for k, v in sd.items() if k.startswith("attention.")}
        stray = [k for k in sd if not k.startswith(("encoder.", "attention."))]
        if stray:
            raise WeightFileError(f"{path}: unexpected keys {stray[:4]}")
        return _build(enc, att, int(meta.get("heads", DEFAULT_HEADS)), (path, path), meta, expect_family)
    if set(loaded) != {"aligner", "layers"}:
        raise WeightFileError(f"{', '.join(paths)}: need both aligner and layer weights, got only {', '.join(loaded)}")
    apath, asd, _ = loaded["aligner"]
    lpath, lsd, _ = loaded["layers"]
    return _build(_aligner_from_official(asd), _attention_from_official(lsd, lpath), DEFAULT_HEADS,
                  (apath, lpath), {"source": f"{os.path.basename(apath)} + {os.path.basename(lpath)}"}, expect_family)


def save_ssr_weights(model: SSRWeights, path: str, extra_metadata: Optional[Dict[str, str]] = None) -> None:
    """Write our single-file ``.safetensors`` (fp32 unless the module is cast) with metadata."""
    from safetensors.torch import save_file

    metadata = {k: str(v) for k, v in model.metadata.items()}
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    metadata.update(model.describe())
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _plain_tensors(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # Own, contiguous CPU storage per tensor: torch.save writes whole storages, and a view
    # would drag its base (or a neighbour's bytes) into the file.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_official_pair(model: SSRWeights, folder: str) -> Tuple[str, str]:
    """Write the authors' pair into ``folder``: ``pytorch_model.bin`` (aligner) and
    ``pytorch_model_1.bin`` (layer weights), plain tensor dicts in the official key layout
    (``official_state_dicts``), saved with ``torch.save`` so that the reference code's
    ``torch.load`` reads them and our ``weights_only`` loading does too. -> the two paths."""
    aligner, layers = official_state_dicts(model)
    return _save_pair(folder, PAIR_NAMES[0], (aligner, layers),
                      lambda tensors, tmp: torch.save(_plain_tensors(tensors), tmp))


def save_reexport_pair(model: SSRWeights, folder: str, extra_metadata: Optional[Dict[str, str]] = None
                       ) -> Tuple[str, str]:
    """Write the safetensors pair into ``folder``: ``ssr_aligner.safetensors`` (aligner keys
    without the ``aligner.`` / ``aligner.processor.`` prefixes) and
    ``ssr_attentions.safetensors`` (the official layer keys), the layout the ComfyUI port and
    most downloads use. Metadata: ``format: pt`` plus ``extra_metadata``. -> the two paths."""
    from safetensors.torch import save_file

    metadata = {k: str(v) for k, v in (extra_metadata or {}).items()}
    metadata["format"] = "pt"
    return _save_pair(folder, PAIR_NAMES[1], reexport_state_dicts(model),
                      lambda tensors, tmp: save_file(_plain_tensors(tensors), tmp, metadata=metadata))


def _save_pair(folder: str, names: Tuple[str, str], states, save) -> Tuple[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = tuple(os.path.join(folder, name) for name in names)
    for path, tensors in zip(paths, states):
        write_atomically(path, lambda tmp, tensors=tensors: save(tensors, tmp))
    return paths


# What ``export_ssr_weights`` writes: "single" is one file, the pairs go into a folder.
EXPORT_FORMATS = ("single", "official", "reexport")


def export_ssr_weights(model: SSRWeights, fmt: str, output: str,
                       extra_metadata: Optional[Dict[str, str]] = None) -> Tuple[str, ...]:
    """Write ``model`` as ``fmt`` (one of EXPORT_FORMATS): "single" -> the file ``output``
    (.safetensors); "official" / "reexport" -> the pair inside the folder ``output``.
    The official .bin files carry no metadata (plain tensor dicts). -> the paths written."""
    if fmt == "single":
        save_ssr_weights(model, output, extra_metadata)
        return (output,)
    if fmt == "official":
        return save_official_pair(model, output)
    if fmt == "reexport":
        return save_reexport_pair(model, output, extra_metadata)
    raise ValueError(f"unknown SSR weight format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")


def official_state_dicts(model: SSRWeights) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """-> (aligner dict in the official ``pytorch_model.bin`` layout, layer dict in the
    ``pytorch_model_1.bin`` layout). Used by tests and by anyone exporting to the reference code."""
    aligner = {}
    for k, v in model.encoder.state_dict().items():
        if k.startswith(("to_v.", "to_out.")):
            aligner["aligner.processor." + k] = v
        elif k.startswith(("to_q.", "to_k.")):
            aligner["aligner." + k] = v
        else:
            aligner[k] = v
    layers = {}
    for j, kv in enumerate(model.attention):
        layers[f"{official_index(j)}.to_k_SSR.weight"] = kv.to_k.weight.detach().clone()
        layers[f"{official_index(j)}.to_v_SSR.weight"] = kv.to_v.weight.detach().clone()
    return aligner, layers


def reexport_state_dicts(model: SSRWeights) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """-> (``ssr_aligner.safetensors`` dict, ``ssr_attentions.safetensors`` dict)."""
    aligner, layers = official_state_dicts(model)
    return {k.replace("aligner.processor.", "").replace("aligner.", ""): v for k, v in aligner.items()}, layers

