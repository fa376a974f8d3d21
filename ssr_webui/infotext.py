"""Generation-parameter ("infotext") keys: what is written, and which control each restores.

Written (``p.extra_generation_params``), e.g.::

    SSR-Encoder: True, SSR scale: 0.65, SSR start: 0, SSR end: 1,
    SSR model: ssr_sd15.safetensors, SSR model hash: 1a2b3c4d, SSR CLIP: clip_vision/clip_vitl.pth,
    SSR 1 mode: text, SSR 1 query: the dog, SSR 1 weight: 1, SSR 2 mode: mask, SSR 2 weight: 1, ...

Empty values are left out (a mask-only subject has no query key). When SSR-Encoder was
enabled but could not act on any step, ``SSR-Encoder`` says so and why, e.g.
``SSR-Encoder: not applied (start/end window 0.95-1 covers no sampling step of 5)``, and the
other keys still record the settings.

Every control is paired with one plain key, so both "PNG info -> Send to" (which parses the
text) and the "Send to img2img" buttons (which copy controls whose key is listed in
``paste_field_names``) restore it; the WebUI converts each value to the control's type
(bool("True"), float("0.65"), ...; any non-empty text, "not applied (...)" included, enables
the accordion again, with the settings that were used). A key that is absent leaves its
control as it is. Reference images and masks are not restored.
"""
from __future__ import annotations

from typing import Dict, List, Optional

ENABLED = "SSR-Encoder"
SCALE, START, END = "SSR scale", "SSR start", "SSR end"
MODEL, MODEL_HASH, CLIP = "SSR model", "SSR model hash", "SSR CLIP"
ERROR = "SSR error"


def subject_key(slot: int, what: str) -> str:
    """slot 0-based; what in {"mode", "query", "weight", "mask weight"}."""
    return f"SSR {slot + 1} {what}"


def slot_keys(slot: int) -> List[str]:
    """Keys of one slot's controls, in the slot's control order (image has none)."""
    return [subject_key(slot, "query"), subject_key(slot, "weight"), subject_key(slot, "mask weight")]


def infotext_value(text: str) -> str:
    """A free text value that survives the round trip. The WebUI JSON-quotes values holding
    ',', ':' or a newline itself; an empty value or one starting/ending with '"' is quoted
    here (the parser would otherwise drop it or strip its quotes)."""
    if any(c in text for c in ",:\n"):
        return text
    if text == "" or text.startswith('"') or text.endswith('"'):
        import json

        return json.dumps(text, ensure_ascii=False)
    return text


def number(value: float) -> str:
    return f"{value:g}"


def not_applied_value(reason: str) -> str:
    """The ``SSR-Encoder`` value of a generation it was enabled for but did not act on."""
    return f"not applied ({reason})"


def generation_params(request, model_name: str, model_hash: Optional[str], clip_name: str,
                      not_applied: Optional[str] = None) -> Dict[str, object]:
    """SSRRequest + model names -> the keys above. ``not_applied``: why nothing was applied
    (written as the ``SSR-Encoder`` value). Empty values (no query, no hash) are left out."""
    params: Dict[str, object] = {
        ENABLED: True if not_applied is None else not_applied_value(not_applied),
        SCALE: number(request.scale), START: number(request.start), END: number(request.end),
        MODEL: model_name, MODEL_HASH: model_hash, CLIP: clip_name,
    }
    for s in request.subjects:
        params[subject_key(s.slot, "mode")] = s.mode
        params[subject_key(s.slot, "query")] = infotext_value(s.query) if s.query else None
        params[subject_key(s.slot, "weight")] = number(s.weight)
        if s.mode == "mask":
            params[subject_key(s.slot, "mask weight")] = number(s.mask_weight)
    return {k: v for k, v in params.items() if v is not None and v != ""}


def is_ssr_key(key: str) -> bool:
    return key == ENABLED or key.startswith("SSR ")
