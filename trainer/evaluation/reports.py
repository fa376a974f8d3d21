"""What the score step writes: metrics.json, per_image.csv, table.md, contact_sheet.html
and contact_sheet.png (a picture of the first subjects' sheets).

table.md follows the layout of the paper's Table 2: one row per method; the multi-subject
bench's CLIP-T / CLIP-ES / DINO-M, then DreamBench's CLIP-T / CLIP-I / DINO, plus the
aesthetic score. A single score run fills its bench's columns; ``compare`` adds the rows of
other runs' metrics.json (other methods, the other bench: runs with the same method name
share a row). Every report names the models used.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from typing import Dict, List, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from .benches import Bench
from .metrics import LOWER_IS_BETTER, METRICS, TITLES, summarize

TABLE_COLUMNS = [("multi_subject", "clip_t"), ("multi_subject", "clip_es"), ("multi_subject", "dino_m"),
                 ("dreambench", "clip_t"), ("dreambench", "clip_i"), ("dreambench", "dino"), (None, "aesthetic")]
BENCH_TITLES = {"multi_subject": "Multi-subject", "dreambench": "DreamBench"}


def summary(bench: Bench, rows: List[Dict], models: Dict[str, str], images_dir: str, method: str,
            table_metrics: Sequence[str]) -> Dict:
    """The content of metrics.json: overall means (over all images), per-subject means."""
    per_subject = {}
    for s in bench.subjects:
        mine = [r for r in rows if r["subject"] == s.key]
        if mine:
            per_subject[s.key] = dict(summarize(mine), images=len(mine))
    return {
        "method": method, "bench": {"kind": bench.kind, "source": os.path.abspath(bench.source),
                                    "subjects": len(bench.subjects)},
        "images_dir": os.path.abspath(images_dir), "images": len(rows), "models": models,
        "table_metrics": list(table_metrics), "overall": summarize(rows), "per_subject": per_subject,
        "subjects_without_images": [s.key for s in bench.subjects if s.key not in per_subject],
        "note": "plain cosines in [-1, 1] (not x100); CLIP-ES: lower is better; aesthetic: LAION scale 1-10",
    }


def write_json(path: str, data: Dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def write_csv(path: str, rows: List[Dict]) -> None:
    fields = ["subject", "prompt_index", "prompt", "file"] + list(METRICS)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]))
                             for k in fields})


def _cell(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(summaries: List[Dict]) -> str:
    """Table 2's layout from one or more metrics.json contents."""
    methods: Dict[str, Dict] = {}
    for s in summaries:
        cells = methods.setdefault(s["method"], {})
        for bench_kind, metric in TABLE_COLUMNS:
            if bench_kind is None or bench_kind == s["bench"]["kind"]:
                if metric in s["table_metrics"] or bench_kind is None:
                    value = s["overall"].get(metric)
                    if value is not None:
                        cells[(bench_kind, metric)] = value
    header = ["Method"] + [
        (f"{BENCH_TITLES[b]} " if b else "") + TITLES[m] + (" ↓" if m in LOWER_IS_BETTER else " ↑")
        for b, m in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, cells in methods.items():
        lines.append("| " + " | ".join([method] + [_cell(cells.get(c)) for c in TABLE_COLUMNS]) + " |")
    lines.append("")
    lines.append("Plain cosines (the paper's CLIP/DINO values are the same cosines); mean over all images. "
                 "Models used:")
    seen = set()
    for s in summaries:
        for role, text in s["models"].items():
            if (role, text) not in seen:
                seen.add((role, text))
                lines.append(f"- {role}: {text}")
    for s in summaries:
        lines.append(f"- {s['method']} on {BENCH_TITLES[s['bench']['kind']]}: {s['images']} images from "
                     f"{s['images_dir']}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- contact sheets

def _thumbnail(path_or_image, size: int) -> Image.Image:
    """The image scaled (down or up) so its longer side is ``size``."""
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    image = image.convert("RGB")
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _score_text(row: Dict, names: Sequence[str]) -> str:
    return " · ".join(f"{TITLES[n]} {row[n]:.3f}" for n in names if row.get(n) is not None)


def _masked_reference(subject):
    from .metrics import masked_subject

    with Image.open(subject.source_image) as image, Image.open(subject.mask) as mask:
        return masked_subject(image, mask)


def write_contact_sheet_html(path: str, bench: Bench, rows: List[Dict], images_dir: str, data: Dict,
                             thumb: int = 160) -> None:
    """One self-contained page (thumbnails embedded): per subject its references (and the
    masked reference DINO-M uses), then every generated image with its prompt and scores."""
    names = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>SSR-Encoder evaluation</title><style>",
           "body{font-family:sans-serif;margin:1em} .row{display:flex;flex-wrap:wrap;gap:8px}",
           "figure{margin:0;width:%dpx;font-size:11px} img{display:block;width:100%%}" % thumb,
           "h2{margin-top:1.5em;border-top:1px solid #ccc;padding-top:.5em} .ref img{outline:3px solid #4a7}",
           "</style></head><body>",
           f"<h1>{html.escape(data['method'])} on {html.escape(BENCH_TITLES[bench.kind])}</h1>",
           "<p>" + " · ".join(f"{TITLES[k]} {v:.3f}" for k, v in data["overall"].items() if v is not None)
           + f" (mean of {data['images']} images)</p>",
           "<ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in data["models"].items()) + "</ul>"]
    for s in bench.subjects:
        mine = [r for r in rows if r["subject"] == s.key]
        if not mine:
            continue
        means = data["per_subject"][s.key]
        out.append(f"<h2>{html.escape(s.key)}</h2><p>query {html.escape(repr(s.query))}, label "
                   f"{html.escape(repr(s.label))} · " + html.escape(_score_text(means, names)) + "</p>")
        out.append("<div class='row'>")
        for r in s.references:
            out.append(f"<figure class='ref'><img src='{_data_uri(_thumbnail(r, thumb))}'>"
                       f"<figcaption>reference {html.escape(os.path.basename(r))}</figcaption></figure>")
        if s.mask:
            out.append(f"<figure class='ref'><img src='{_data_uri(_thumbnail(_masked_reference(s), thumb))}'>"
                       "<figcaption>masked reference (DINO-M)</figcaption></figure>")
        out.append("</div><div class='row' style='margin-top:8px'>")
        for r in mine:
            image = _thumbnail(os.path.join(images_dir, r["file"]), thumb)
            out.append(f"<figure><img src='{_data_uri(image)}'><figcaption><b>{html.escape(r['prompt'])}</b><br>"
                       f"{html.escape(os.path.basename(r['file']))}<br>{html.escape(_score_text(r, names))}"
                       "</figcaption></figure>")
        out.append("</div>")
    out.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))


def render_contact_sheet_png(path: str, bench: Bench, rows: List[Dict], images_dir: str, max_subjects: int = 3,
                             max_images: int = 6, thumb: int = 128) -> None:
    """The first subjects' sheets as one picture: a row of references (and the masked
    reference), then a row of generations, each captioned with its prompt and scores."""
    names = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    font = ImageFont.load_default()
    line_h = 12
    caption_h, title_h, pad = line_h * (1 + len(names)) + 6, 22, 8
    blocks = []
    for s in [s for s in bench.subjects if any(r["subject"] == s.key for r in rows)][:max_subjects]:
        refs = [(_thumbnail(r, thumb), "reference") for r in s.references[:max_images]]
        if s.mask:
            refs.append((_thumbnail(_masked_reference(s), thumb), "masked ref."))
        gens = [(_thumbnail(os.path.join(images_dir, r["file"]), thumb), r)
                for r in [r for r in rows if r["subject"] == s.key][:max_images]]
        blocks.append((s, refs, gens))
    columns = max(max(len(b[1]), len(b[2])) for b in blocks)
    cell_w = thumb + pad
    width = pad + columns * cell_w
    block_h = title_h + (thumb + line_h + 2 * pad) + (thumb + caption_h + pad)
    sheet = Image.new("RGB", (width, pad + len(blocks) * block_h), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for s, refs, gens in blocks:
        draw.text((pad, y + 4), f"{s.key}  (query: {s.query!r})", fill="black", font=font)
        y += title_h
        for i, (image, caption) in enumerate(refs):
            x = pad + i * cell_w
            sheet.paste(image, (x, y))
            draw.rectangle([x - 2, y - 2, x + image.width + 1, y + image.height + 1], outline=(60, 160, 110), width=2)
            draw.text((x, y + thumb + 4), caption, fill=(60, 120, 80), font=font)
        y += thumb + line_h + 2 * pad
        for i, (image, row) in enumerate(gens):
            x = pad + i * cell_w
            sheet.paste(image, (x, y))
            prompt = row["prompt"] if len(row["prompt"]) <= 22 else row["prompt"][:21] + "…"
            scores = "\n".join(f"{TITLES[n]}: {row[n]:.3f}" for n in names if row.get(n) is not None)
            draw.multiline_text((x, y + thumb + 3), prompt + "\n" + scores, fill="black", font=font, spacing=2)
        y += thumb + caption_h + pad
    sheet.save(path)


def write_reports(out_dir: str, bench: Bench, rows: List[Dict], models: Dict[str, str], images_dir: str,
                  method: str, table_metrics: Sequence[str], compare: Sequence[str] = ()) -> Dict:
    """Writes every report into ``out_dir``; -> the metrics.json content."""
    os.makedirs(out_dir, exist_ok=True)
    data = summary(bench, rows, models, images_dir, method, table_metrics)
    write_json(os.path.join(out_dir, "metrics.json"), data)
    write_csv(os.path.join(out_dir, "per_image.csv"), rows)
    others = []
    for path in compare:
        try:
            with open(path, encoding="utf-8") as f:
                others.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read as a metrics.json of an earlier score run ({e})") from None
        for key in ("method", "bench", "overall", "models", "table_metrics", "images", "images_dir"):
            if key not in others[-1]:
                raise ValueError(f"{path}: not a metrics.json written by the score step (no {key!r} field)")
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table([data] + others))
    write_contact_sheet_html(os.path.join(out_dir, "contact_sheet.html"), bench, rows, images_dir, data)
    render_contact_sheet_png(os.path.join(out_dir, "contact_sheet.png"), bench, rows, images_dir)
    return data
