"""The "SSR-Encoder" accordion (gradio 3.41.2 as the WebUI and reForge pin it; gradio 4.40 in
Forge, where each reference image is an ``ImageEditor`` whose painted strokes are the mask).

``build`` returns the controls whose values become the script's positional arguments, in
the order ``request.parse_positional_args`` reads them, plus the infotext pairs. It creates
no state outside the components, so the WebUI may call it many times (the API does, inside
a fresh ``gr.Blocks``, to read defaults).
"""
from __future__ import annotations

import contextlib
import html
from typing import List, Tuple

import gradio as gr

from . import EXTENSION_TITLE, infotext, settings
from .preview import heatmap_overlay
from .request import DEFAULTS, MASK_WEIGHT_RANGE, SCALE_RANGE, WEIGHT_RANGE, ArgumentError, parse_subject, ui_subject_field
from .runtime import scrub_paths

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def generation_lock():
    """The WebUI's queue lock (held while generating), so a preview waits for the GPU."""
    try:
        from modules.call_queue import queue_lock

        return queue_lock
    except Exception:  # noqa: BLE001 - not in the WebUI (tests)
        return contextlib.nullcontext()


def _choices(runtime) -> Tuple[List[str], List[str]]:
    try:
        listing = runtime.list_models()
        return listing.names("ssr"), listing.names("clip")
    except OSError:
        return [], []


def _image_component(slot: int, elem_id: str):
    label = f"Subject {slot + 1} image (draw over the subject to select it by mask)"
    if GRADIO_MAJOR >= 4:  # Forge: gradio 4 has no sketch tool; its ImageEditor paints layers over the upload
        return gr.ImageEditor(label=label, type="pil", sources=["upload", "clipboard"], transforms=[],
                              brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id=elem_id)
    return gr.Image(label=label, source="upload", tool="sketch", type="pil", brush_radius=24, brush_color="#ffffff",
                    mask_opacity=0.55, height=320, elem_id=elem_id)


def build(script, runtime):
    """-> (controls, infotext_fields, paste_field_names)."""
    eid = script.elem_id
    from modules.ui_components import FormRow, InputAccordion, ToolButton

    slots = settings.slot_count()
    ssr_names, clip_names = _choices(runtime)
    with InputAccordion(False, label=EXTENSION_TITLE, elem_id=eid("enabled")) as enabled:
        with FormRow():
            model = gr.Dropdown(label="SSR weights (models/ssr_encoder)", choices=ssr_names,
                                value=ssr_names[0] if ssr_names else None, elem_id=eid("model"))
            clip_model = gr.Dropdown(label="CLIP ViT-L/14 vision weights", choices=clip_names,
                                     value=clip_names[0] if clip_names else None, elem_id=eid("clip_model"))
            refresh = ToolButton(value="\U0001f504", elem_id=eid("refresh"))
        with FormRow():
            scale = gr.Slider(label="Subject scale (lambda)", minimum=SCALE_RANGE[0], maximum=SCALE_RANGE[1], step=0.05,
                              value=DEFAULTS["scale"], elem_id=eid("scale"))
            start = gr.Slider(label="Start at (fraction of steps)", minimum=0.0, maximum=1.0, step=0.01,
                              value=DEFAULTS["start"], elem_id=eid("start"))
            end = gr.Slider(label="End at (fraction of steps)", minimum=0.0, maximum=1.0, step=0.01,
                            value=DEFAULTS["end"], elem_id=eid("end"))
        slot_controls = []
        with gr.Tabs(elem_id=eid("slots")):
            for i in range(slots):
                with gr.Tab(f"Subject {i + 1}", elem_id=eid(f"slot_{i + 1}")):
                    image = _image_component(i, eid(f"image_{i + 1}"))
                    query = gr.Textbox(label=f"Subject {i + 1} query", lines=1, elem_id=eid(f"query_{i + 1}"),
                                       placeholder="what to take from the image, e.g. 'the dog' (may stay empty when a mask is drawn)")
                    with FormRow():
                        weight = gr.Slider(label=f"Subject {i + 1} weight", minimum=WEIGHT_RANGE[0], maximum=WEIGHT_RANGE[1],
                                           step=0.05, value=DEFAULTS["weight"], elem_id=eid(f"weight_{i + 1}"))
                        mask_weight = gr.Slider(label=f"Subject {i + 1} mask strength", minimum=MASK_WEIGHT_RANGE[0],
                                                maximum=MASK_WEIGHT_RANGE[1], step=0.5, value=DEFAULTS["mask_weight"],
                                                elem_id=eid(f"mask_weight_{i + 1}"))
                slot_controls.extend([image, query, weight, mask_weight])
        with FormRow():
            preview_button = gr.Button("Preview selection", elem_id=eid("preview_button"))
        gallery = gr.Gallery(label="Selection preview (what each query attends to, on the square CLIP sees)",
                             columns=min(slots, 4), height="auto", elem_id=eid("preview"))
        status = gr.HTML(elem_id=eid("status"))

    def refresh_choices(current_model, current_clip):
        new_ssr, new_clip = _choices(runtime)
        return (gr.update(choices=new_ssr, value=current_model if current_model in new_ssr else (new_ssr or [None])[0]),
                gr.update(choices=new_clip, value=current_clip if current_clip in new_clip else (new_clip or [None])[0]))

    def run_preview(model_name, clip_name, *slot_values):
        return preview_slots(runtime, model_name, clip_name, slot_values)

    refresh.click(fn=refresh_choices, inputs=[model, clip_model], outputs=[model, clip_model], show_progress=False)
    preview_button.click(fn=run_preview, inputs=[model, clip_model] + slot_controls, outputs=[gallery, status])

    controls = [enabled, scale, start, end, model, clip_model] + slot_controls
    fields = [(enabled, infotext.ENABLED), (scale, infotext.SCALE), (start, infotext.START), (end, infotext.END),
              (model, infotext.MODEL), (clip_model, infotext.CLIP)]
    for i in range(slots):
        _, query, weight, mask_weight = slot_controls[4 * i: 4 * i + 4]
        fields += list(zip((query, weight, mask_weight), infotext.slot_keys(i)))
    return controls, fields, [key for _, key in fields]


def loaded_sd_model():
    """The checkpoint a generation would use now. Forge loads it at the first generation (until
    then ``shared.sd_model`` is a placeholder without a text encoder) through
    ``sd_models.forge_model_reload()``, which returns the loaded model and loads nothing when it
    is current: a preview before any generation loads it the same way. Call under
    ``generation_lock()``."""
    from modules import sd_models, shared

    reload = getattr(sd_models, "forge_model_reload", None)
    if callable(reload):
        return reload()[0]
    return shared.sd_model


def preview_slots(runtime, model_name, clip_name, slot_values):
    """Preview button: -> (gallery items [(overlay, caption)], status HTML)."""
    items, notes = [], []
    for slot in range(len(slot_values) // 4):
        image, query, weight, mask_weight = slot_values[4 * slot: 4 * slot + 4]
        try:
            subject = parse_subject(image, query, weight, mask_weight, prefix=ui_subject_field(slot), slot=slot)
        except ArgumentError as e:
            notes.append(str(e))
            continue
        if subject is None:
            continue
        try:
            with generation_lock():
                heatmap, _, _, _ = runtime.preview(subject, model_name, clip_name, loaded_sd_model())
        except Exception as e:  # noqa: BLE001 - shown to the user, with paths relative to the models folder
            notes.append(scrub_paths(runtime, f"Subject {slot + 1}: {e}"))
            continue
        caption = f"Subject {slot + 1}: {subject.mode} query" + (f" '{subject.query}'" if subject.query else "")
        items.append((heatmap_overlay(subject.image, heatmap, mask=subject.mask), caption))
    if not items and not notes:
        notes.append("Add a reference image and a query (or draw a mask) in a subject slot first.")
    for note in notes:
        try:
            gr.Warning(f"SSR-Encoder preview: {note}")
        except Exception:  # noqa: BLE001
            pass
    status = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return items, status
