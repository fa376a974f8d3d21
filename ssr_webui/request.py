"""Script arguments -> a validated ``SSRRequest``, with errors that name the field.

Two argument forms reach the script (docs/webui-host-notes.md, sections 3 and 4):
- positional, as the UI sends them (and API callers who copy that list):
  ``[enabled, scale, start, end, model, clip_model, (image, query, weight, mask_weight) x slots]``;
  ``image`` is what ``gr.Image(tool="sketch")`` returns, ``{"image": PIL, "mask": PIL}``, or a
  base64 string / ``{"image": b64, "mask": b64}`` over the API;
- one dict, in the style of sd-webui-controlnet units:
  ``{"enabled", "scale", "start", "end", "model", "clip_model",
     "subjects": [{"image", "query", "mask", "weight", "mask_weight"}]}``.
The WebUI copies API values into place without any checking, so everything is checked here:
types, ranges, image decoding and size, number of subjects, unknown keys (typos).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

MAX_SUBJECTS = 8
MAX_IMAGE_BYTES = 24 * 1024 * 1024  # decoded size of one base64 image
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_QUERY_CHARS = 1000
SCALE_RANGE = (0.0, 2.0)
STEP_FRACTION_RANGE = (0.0, 1.0)
WEIGHT_RANGE = (0.0, 2.0)
MASK_WEIGHT_RANGE = (0.0, 20.0)
DEFAULTS = {"scale": 0.65, "start": 0.0, "end": 1.0, "weight": 1.0, "mask_weight": 5.0}
GLOBAL_FIELDS = ("enabled", "scale", "start", "end", "model", "clip_model")
SLOT_FIELDS = ("image", "query", "weight", "mask_weight")
DICT_FIELDS = GLOBAL_FIELDS + ("subjects",)
SUBJECT_FIELDS = ("image", "query", "mask", "weight", "mask_weight")
# The positional form is what the UI sends: its errors name the controls by their labels.
UI_FIELD_NAMES = {"enabled": "SSR-Encoder", "scale": "Subject scale", "start": "Start at", "end": "End at",
                  "model": "SSR weights", "clip_model": "CLIP ViT-L/14 vision weights", "subjects": "SSR-Encoder"}
UI_SUBJECT_SUFFIXES = {"image": "", "query": " query", "weight": " weight", "mask_weight": " mask strength",
                       "mask": " mask", "image.mask": " mask"}
FieldNamer = Union[str, Callable[[str], str]]  # a prefix ("subjects[0].") or key -> field name

_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_LOOKS_LIKE_URL_OR_PATH = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|[/~.])|\\|\.(?:png|jpe?g|webp|gif|bmp)$", re.IGNORECASE)
NOT_AN_IMAGE = "not a base64 image or data URL"
# File signatures of the formats accepted, and the one Pillow plugin each may be opened with.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"))


def ui_subject_field(slot: int) -> Callable[[str], str]:
    """Field names of UI slot ``slot`` (0-based), as its controls are labelled: "Subject 1"
    (the image), "Subject 1 query", "Subject 1 weight", "Subject 1 mask strength", ..."""
    return lambda key: f"Subject {slot + 1}{UI_SUBJECT_SUFFIXES.get(key, ' ' + key)}"


class ArgumentError(ValueError):
    """An invalid argument; ``field`` is its path, e.g. ``subjects[1].mask``."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


@dataclass
class SubjectRequest:
    """One subject: an RGB(A) reference image, the query text, and a mask (HxW float array in
    [0, 1], white = selected) in mask mode or None in text mode."""

    image: Image.Image
    query: str = ""
    mask: Optional[np.ndarray] = None
    weight: float = DEFAULTS["weight"]
    mask_weight: float = DEFAULTS["mask_weight"]
    slot: int = 0  # 0-based UI slot / API list position (infotext numbering is slot + 1)

    @property
    def mode(self) -> str:
        return "mask" if self.mask is not None else "text"

    def to_subject(self):
        """-> the core library's ``ssr.Subject``."""
        from ssr import Subject

        return Subject(image=self.image, query=self.query, mask=self.mask, weight=self.weight, mask_weight=self.mask_weight)


@dataclass
class SSRRequest:
    enabled: bool = False
    scale: float = DEFAULTS["scale"]
    start: float = DEFAULTS["start"]
    end: float = DEFAULTS["end"]
    model: Optional[str] = None  # None: the first weights found
    clip_model: Optional[str] = None
    subjects: List[SubjectRequest] = field(default_factory=list)
    form: str = "positional"  # or "dict"

    def field_name(self, key: str) -> str:
        """How errors about a global field (e.g. "model") name it in this request's form."""
        return UI_FIELD_NAMES.get(key, key) if self.form == "positional" else key


# ----------------------------------------------------------------------------- scalar fields

def _number(value: Any, name: str, bounds: Tuple[float, float]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentError(name, f"expected a number in [{bounds[0]:g}, {bounds[1]:g}], got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        raise ArgumentError(name, f"{value:g} is out of range; expected a number in [{bounds[0]:g}, {bounds[1]:g}]")
    return value


def _boolean(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(name, f"expected true or false, got {type(value).__name__} {value!r:.40}")
    return bool(value)


def _text(value: Any, name: str, limit: int = MAX_QUERY_CHARS) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ArgumentError(name, f"expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ArgumentError(name, f"{len(value)} characters; at most {limit} are accepted")
    return value.strip()


def _model_name(value: Any, name: str) -> Optional[str]:
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        return None
    if not isinstance(value, str):
        raise ArgumentError(name, f"expected a file name from GET /ssr/models, got {type(value).__name__}")
    return value.strip()


# ----------------------------------------------------------------------------- images

def _not_an_image(name: str, value: str, reason: str, maybe_path: bool = True) -> ArgumentError:
    hint = "; send the image file's bytes base64-encoded, optionally as a data URL (data:image/png;base64,...)"
    if maybe_path and _LOOKS_LIKE_URL_OR_PATH.search(value.strip()[:300]):
        hint += "; URLs and server paths are not accepted"
    return ArgumentError(name, f"{NOT_AN_IMAGE} ({reason}){hint}")


def decode_base64_image(value: str, name: str) -> Image.Image:
    """A base64 string or ``data:...;base64,`` URL -> a loaded PIL image (EXIF rotation
    applied). Never opens a file or URL: the text must be base64 (alphabet ``A-Za-z0-9+/``,
    ``=`` padding; whitespace ignored) whose bytes start with a PNG, JPEG, WebP, GIF or BMP
    signature. A path such as ``/etc/passwd`` may consist of base64 characters, but its bytes
    are no image, so it is refused by the same rule; and the base64 of every JPEG starts with
    ``/9j/``, so no rule on a leading ``/`` can be used. Checks the encoded size and the pixel
    count before decoding the pixels."""
    text = value.strip()
    match = _DATA_URL.match(text)
    if match:
        if ";base64" not in match.group(2).lower():
            raise _not_an_image(name, value, "a data URL must be base64-encoded: data:image/...;base64,...")
        text = text[match.end():]
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ArgumentError(name, f"image data is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    if not text:
        raise _not_an_image(name, value, "no data")
    if not _BASE64.match(text):
        bad = next(c for c in text if not (c.isascii() and (c.isalnum() or c in "+/=")))
        raise _not_an_image(name, value, f"it contains {bad!r}, which base64 does not use")
    if len(text) % 4 == 1:
        raise _not_an_image(name, value, "its length is not that of base64 data")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _not_an_image(name, value, f"invalid base64: {e}") from e
    kind = next((fmt for magic, fmt in _SIGNATURES if raw.startswith(magic)), None)
    if kind is None and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is None:
        raise _not_an_image(name, value, "the decoded bytes are not a PNG, JPEG, WebP, GIF or BMP file")
    try:
        image = Image.open(io.BytesIO(raw), formats=[kind])
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ArgumentError(name, f"image is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels are accepted")
        image.load()
    except ArgumentError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable data
        raise _not_an_image(name, value, f"the {kind} data cannot be decoded: {type(e).__name__}", maybe_path=False) from e
    return ImageOps.exif_transpose(image)


def to_image(value: Any, name: str, kind: str = "image") -> Optional[Image.Image]:
    """PIL image, HxWxC numpy array or base64 string -> an "RGB" PIL image (``kind="image"``:
    transparency over white, 16-bit grey scaled to 8 bits, CMYK converted) or an "L" mask
    (``kind="mask"``: brightness times alpha, white = selected); None stays None."""
    from ssr.image_encoder import mask_to_array, to_pil_rgb

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        if value.ndim not in (2, 3) or value.size == 0:
            raise ArgumentError(name, f"expected an HxW or HxWxC image array, got shape {value.shape}")
        array = value if value.dtype == np.uint8 else np.clip(value, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    elif isinstance(value, str):
        image = decode_base64_image(value, name)
    else:
        raise ArgumentError(name, f"expected a base64-encoded image or data URL, got {type(value).__name__}")
    if image.width < 1 or image.height < 1 or image.width * image.height > MAX_IMAGE_PIXELS:
        raise ArgumentError(name, f"image is {image.width}x{image.height}; expected 1 to {MAX_IMAGE_PIXELS} pixels")
    try:
        if kind == "mask":
            return Image.fromarray(np.round(mask_to_array(image, name) * 255.0).astype(np.uint8), "L")
        return to_pil_rgb(image, what=name)
    except (ValueError, TypeError, OSError) as e:
        raise ArgumentError(name, f"cannot read this image ({image.mode}): {e}") from e


def _check_mask(mask: np.ndarray, image: Image.Image, name: str) -> None:
    h, w = mask.shape
    if abs(w / h - image.width / image.height) > 0.01 * image.width / image.height:
        raise ArgumentError(name, f"mask is {w}x{h} but the image is {image.width}x{image.height}; "
                                  "the mask must have the image's aspect ratio")


# ----------------------------------------------------------------------------- subjects

def editor_image_and_mask(value: dict):
    """gradio 4's ``ImageEditor`` value ``{"background", "layers", "composite"}`` -> (the
    uploaded image, the strokes painted over it as a white-on-black mask, or None when no
    stroke was painted). Any painted pixel (alpha > 0 in any layer) selects. An editor nothing
    was uploaded into sends its empty canvas (gradio 4.40: 800x600, every pixel transparent) as
    the background: that is no image (an empty slot), not a transparent picture."""
    background = value.get("background")
    if isinstance(background, Image.Image) and "A" in background.getbands() and background.getchannel("A").getextrema()[1] == 0:
        background = None
    layers = [layer for layer in (value.get("layers") or []) if layer is not None]
    if background is None or not layers:
        return background, None
    alpha = None
    for layer in layers:
        if not isinstance(layer, Image.Image):
            continue
        a = layer.convert("RGBA").getchannel("A")
        alpha = a if alpha is None else Image.fromarray(np.maximum(np.asarray(alpha), np.asarray(a)))
    if alpha is None:
        return background, None
    return background, alpha.point(lambda v: 255 if v > 0 else 0)


def parse_subject(image_value: Any, query: Any, weight: Any, mask_weight: Any, *, mask_value: Any = None,
                  prefix: FieldNamer, slot: int, explicit_mask: bool = False) -> Optional[SubjectRequest]:
    """One slot / subject dict -> SubjectRequest, or None for an empty slot.

    ``image_value`` may be a sketch dict ``{"image", "mask"}``; an all-black sketch mask means
    "no mask drawn" (text mode). A mask sent explicitly (``explicit_mask``) must select something.
    ``prefix`` names the fields in errors: a string put before the key ("subjects[0].") or a
    function of the key (``ui_subject_field(slot)``)."""
    from ssr.image_encoder import mask_to_array

    field_of = prefix if callable(prefix) else (lambda key, _prefix=prefix: f"{_prefix}{key}")
    image_field = field_of("image")
    sketch_mask = None
    if isinstance(image_value, dict) and "background" in image_value:  # gradio 4's ImageEditor (Forge)
        image_value, sketch_mask = editor_image_and_mask(image_value)
    if isinstance(image_value, dict):
        unknown = sorted(set(image_value) - {"image", "mask"})
        if unknown:
            raise ArgumentError(image_field, f"unknown keys {unknown}; expected 'image' and optionally 'mask'")
        sketch_mask = image_value.get("mask")
        image_value = image_value.get("image")
    image = to_image(image_value, image_field)
    query_text = _text(query, field_of("query"))
    if image is None:
        if query_text or mask_value is not None:
            given = "a query" if mask_value is None else ("a mask" if not query_text else "a query and a mask")
            raise ArgumentError(image_field, f"{given} was given but no reference image")
        return None
    weight = _number(DEFAULTS["weight"] if weight is None else weight, field_of("weight"), WEIGHT_RANGE)
    mask_weight = _number(DEFAULTS["mask_weight"] if mask_weight is None else mask_weight, field_of("mask_weight"),
                          MASK_WEIGHT_RANGE)
    mask = None
    for value, name, required in ((sketch_mask, field_of("image.mask"), False), (mask_value, field_of("mask"), explicit_mask)):
        mask_image = to_image(value, name, kind="mask")
        if mask_image is None:
            continue
        candidate = mask_to_array(mask_image, name)
        if not (candidate > 0.5).any():
            if required:
                raise ArgumentError(name, "mask is empty (no white pixels); paint the subject white or leave the mask out")
            continue
        _check_mask(candidate, image, name)
        mask = candidate
    if mask is None and not query_text:
        raise ArgumentError(field_of("query"), "give a query text (e.g. 'the dog') or draw a mask over the subject")
    return SubjectRequest(image=image, query=query_text, mask=mask, weight=weight, mask_weight=mask_weight, slot=slot)


def _subject_from_dict(value: Any, index: int) -> SubjectRequest:
    prefix = f"subjects[{index}]."
    if not isinstance(value, dict):
        raise ArgumentError(f"subjects[{index}]", f"expected an object with keys {list(SUBJECT_FIELDS)}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(SUBJECT_FIELDS))
    if unknown:
        raise ArgumentError(f"subjects[{index}]", f"unknown keys {unknown}; expected some of {list(SUBJECT_FIELDS)}")
    if value.get("image") is None:
        raise ArgumentError(f"{prefix}image", "missing; every subject needs a reference image (base64 or data URL)")
    subject = parse_subject(value.get("image"), value.get("query"), value.get("weight"), value.get("mask_weight"),
                            mask_value=value.get("mask"), prefix=prefix, slot=index, explicit_mask="mask" in value)
    assert subject is not None
    return subject


# ----------------------------------------------------------------------------- whole argument lists

def _globals(values: Dict[str, Any], name: Dict[str, str]) -> Dict[str, Any]:
    return {
        "scale": _number(values.get("scale", DEFAULTS["scale"]), name["scale"], SCALE_RANGE),
        "start": _number(values.get("start", DEFAULTS["start"]), name["start"], STEP_FRACTION_RANGE),
        "end": _number(values.get("end", DEFAULTS["end"]), name["end"], STEP_FRACTION_RANGE),
        "model": _model_name(values.get("model"), name["model"]),
        "clip_model": _model_name(values.get("clip_model"), name["clip_model"]),
    }


def _finish(request: SSRRequest) -> SSRRequest:
    name = request.field_name
    if request.start >= request.end:
        raise ArgumentError(name("end"), f"{request.end:g} must be greater than {name('start')} ({request.start:g})")
    if not request.subjects:
        raise ArgumentError(name("subjects"), "no subject: add at least one reference image with a query or a mask")
    if len(request.subjects) > MAX_SUBJECTS:
        raise ArgumentError(name("subjects"), f"{len(request.subjects)} subjects; at most {MAX_SUBJECTS} are accepted")
    return request


def parse_dict_args(args: Dict[str, Any]) -> SSRRequest:
    unknown = sorted(set(args) - set(DICT_FIELDS))
    if unknown:
        raise ArgumentError("args[0]", f"unknown keys {unknown}; expected some of {list(DICT_FIELDS)}")
    enabled = _boolean(args.get("enabled", True), "enabled")
    if not enabled:
        return SSRRequest(enabled=False, form="dict")
    request = SSRRequest(enabled=True, form="dict", **_globals(args, {k: k for k in GLOBAL_FIELDS}))
    subjects = args.get("subjects")
    if not isinstance(subjects, list):
        raise ArgumentError("subjects", f"expected a list of subject objects, got {type(subjects).__name__}")
    if len(subjects) > MAX_SUBJECTS:
        raise ArgumentError("subjects", f"{len(subjects)} subjects; at most {MAX_SUBJECTS} are accepted")
    request.subjects = [_subject_from_dict(s, i) for i, s in enumerate(subjects)]
    return _finish(request)


def parse_positional_args(args: Sequence[Any]) -> SSRRequest:
    """The UI's list. Positions beyond the list, or left None, take the defaults. Errors name
    the UI's controls ("Subject 1 weight"), since that is what the user sees."""
    def at(i):
        return args[i] if i < len(args) else None

    name = {k: UI_FIELD_NAMES[k] for k in GLOBAL_FIELDS}
    if not _boolean(at(0), name["enabled"]):
        return SSRRequest(enabled=False)
    values = {k: at(i) for i, k in enumerate(GLOBAL_FIELDS) if at(i) is not None}
    request = SSRRequest(enabled=True, **_globals(values, name))
    extra = len(args) - len(GLOBAL_FIELDS)
    if extra % len(SLOT_FIELDS):
        raise ArgumentError("args", f"{len(args)} values; expected {len(GLOBAL_FIELDS)} + {len(SLOT_FIELDS)} per subject slot")
    for slot in range(max(0, extra) // len(SLOT_FIELDS)):
        base = len(GLOBAL_FIELDS) + slot * len(SLOT_FIELDS)
        subject = parse_subject(at(base), at(base + 1), at(base + 2), at(base + 3),
                                prefix=ui_subject_field(slot), slot=slot)
        if subject is not None:
            request.subjects.append(subject)
    return _finish(request)


def parse_script_args(args: Sequence[Any]) -> SSRRequest:
    """The script's ``*args`` -> SSRRequest. Raises ArgumentError naming the bad field."""
    if args and isinstance(args[0], dict):
        return parse_dict_args(args[0])
    return parse_positional_args(list(args))
