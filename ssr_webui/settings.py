"""The extension's settings (Settings -> SSR-Encoder) and safe reading of them.

Options exist only after ``on_ui_settings`` has run (not in every API-only start), so every
read falls back to the default here.
"""
from __future__ import annotations

from .request import MAX_SUBJECTS

SECTION = ("ssr_encoder", "SSR-Encoder")
SLOTS = "ssr_encoder_slots"
CLIP_PLACEMENT = "ssr_encoder_clip_placement"
SUBJECT_CACHE = "ssr_encoder_subject_cache"

PLACE_OFFLOAD = "Move to CPU after encoding"
PLACE_GPU = "Keep on GPU"
PLACE_CPU = "Low VRAM: encode on CPU"
PLACEMENTS = (PLACE_OFFLOAD, PLACE_GPU, PLACE_CPU)

DEFAULTS = {SLOTS: 3, CLIP_PLACEMENT: PLACE_OFFLOAD, SUBJECT_CACHE: 32}


def register() -> None:
    """``script_callbacks.on_ui_settings`` callback."""
    import gradio as gr
    from modules import shared

    def add(key, label, component, args, comment=None):
        info = shared.OptionInfo(DEFAULTS[key], label, component, args, section=SECTION)
        if comment and hasattr(info, "info"):
            info = info.info(comment)
        shared.opts.add_option(key, info)

    add(SLOTS, "Number of subject slots in the SSR-Encoder accordion", gr.Slider,
        {"minimum": 1, "maximum": MAX_SUBJECTS, "step": 1}, "reload the UI to apply")
    add(CLIP_PLACEMENT, "Where CLIP vision runs", gr.Radio, {"choices": list(PLACEMENTS)},
        "moving it off the GPU before sampling saves about 1.2 GB of VRAM; low VRAM keeps it on the CPU entirely")
    add(SUBJECT_CACHE, "Encoded subjects kept in memory", gr.Slider, {"minimum": 0, "maximum": 256, "step": 1})


def get(key: str):
    try:
        from modules import shared

        value = getattr(shared.opts, key)
    except Exception:  # noqa: BLE001 - option not registered (API-only start) or no WebUI
        return DEFAULTS[key]
    return DEFAULTS[key] if value is None else value


def slot_count() -> int:
    try:
        return max(1, min(MAX_SUBJECTS, int(get(SLOTS))))
    except (TypeError, ValueError):
        return DEFAULTS[SLOTS]


def clip_placement() -> str:
    value = get(CLIP_PLACEMENT)
    return value if value in PLACEMENTS else PLACE_OFFLOAD
