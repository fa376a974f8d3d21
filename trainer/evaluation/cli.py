"""Command line of ``python -m trainer.evaluate``: the generate and score steps, or both."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

DESCRIPTION = """\
Evaluate subject-driven generation with the metrics of the SSR-Encoder paper (Table 2).

steps (each runs on its own; "all" runs generate, then score):
  generate  SSR-Encoder images for a bench: DDIM 30 steps, CFG 7.5 (the paper's settings),
            several fixed seeds per prompt, progress bar; resumable (finished images are
            skipped). Writes <out>/<subject>/<prompt index>_seed<seed>.png + generation.json.
  score     metrics from folders of images alone (so any method's images can be scored):
            <images>/<subject>/<prompt index>_<anything>.png. Writes metrics.json,
            per_image.csv, table.md (laid out like the paper's Table 2),
            contact_sheet.html (per subject: references, then generations with their
            scores) and contact_sheet.png.

benches:
  DreamBench  its published folder (subject folders + prompts_and_classes.txt); the class
              noun replaces the unique token ("a dog in the snow").
  JSONL       our multi-subject bench: one line per image with 2-3 subjects, each with a
              query and/or mask, a label and prompts (docs/evaluation.md has an example).

metrics (plain cosines, not x100; E = CLIP embedding, D = DINO CLS feature):
  CLIP-T    cos(E_img(generated), E_txt(prompt))                               higher better
  CLIP-I    mean over the subject's references r of cos(E_img(generated), E_img(r))
  DINO      mean over references r of cos(D(generated), D(r))
  CLIP-ES   mean over the other subjects B of the same multi-subject image of
            cos(E_img(generated for A), E_txt(label of B))                     lower better
  DINO-M    cos(D(generated), D(masked reference)); reference: pixels outside the subject's
            mask painted white, cropped to the mask's box; generated image: not masked
  aesthetic LAION aesthetic head on the normalised CLIP ViT-L/14 image embedding (1-10)
DreamBench tables show CLIP-T, CLIP-I, DINO; the multi-subject bench CLIP-T, CLIP-ES, DINO-M.

models (local files; nothing is downloaded; every report lists the models used):
  --clip       default choice: CLIP ViT-B/32. A Hugging Face CLIPModel folder
               (openai/clip-vit-base-patch32) or an open_clip/OpenAI state dict
               (.safetensors/.bin/.pt; --clip-arch names a non-OpenAI open_clip model)
  --dino       default choice: DINO ViT-S/16. A Hugging Face folder (facebook/dino-vits16,
               facebook/dinov2-*) or DINO's torch.hub dino_deitsmall16_pretrain.pth
  --aesthetic-head + --aesthetic-clip: LAION's sac+logos+ava1-l14-linearMSE.pth (or the
               linear sa_0_4_vit_l_14_linear.pth) and CLIP ViT-L/14 in any --clip format
Files are read with safetensors or torch.load(weights_only=True): no pickled code runs.
See docs/evaluation.md.
"""


def _add_generate_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("generate")
    g.add_argument("--pretrained-model", required=required,
                   help="SD1.5 checkpoint (.safetensors/.ckpt, WebUI layout) or diffusers folder")
    g.add_argument("--clip-vision", required=required, help="CLIP ViT-L/14 vision weights for SSR-Encoder "
                                                            "(the files the trainer and extension take)")
    g.add_argument("--ssr-weights", required=required, help="SSR-Encoder weights (our .safetensors or the official pair)")
    g.add_argument("--sd-config-dir", default=None, help="architecture configs for a single-file checkpoint "
                                                          "(default: trainer/sd15)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds per prompt (default 0 1 2 3)")
    g.add_argument("--steps", type=int, default=30, help="DDIM steps (paper: 30)")
    g.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (paper: 7.5)")
    g.add_argument("--subject-scale", type=float, default=1.0, help="subject branch weight lambda (paper: 1)")
    g.add_argument("--mask-weight", type=float, default=5.0, help="mask query strength (bench subjects with a mask)")
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the frozen models")
    g.add_argument("--no-clip-width-check", action="store_true",
                   help="accept a CLIP vision tower that is not 1024 wide (tests with tiny models)")


def _add_score_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("score")
    g.add_argument("--clip", required=required, help="CLIP for CLIP-T/CLIP-I/CLIP-ES (common choice: ViT-B/32)")
    g.add_argument("--clip-arch", default=None, help="open_clip architecture name for a --clip state dict that is not "
                                                     "OpenAI-shaped (e.g. ViT-B-32 for LAION's GELU models)")
    g.add_argument("--dino", required=required, help="DINO for DINO/DINO-M (common choice: ViT-S/16)")
    g.add_argument("--aesthetic-head", default=None, help="LAION aesthetic head .pth (optional)")
    g.add_argument("--aesthetic-clip", default=None, help="CLIP ViT-L/14 for the aesthetic head (any --clip format)")
    g.add_argument("--aesthetic-clip-arch", default=None)
    g.add_argument("--method", default="SSR-Encoder", help="row name in table.md (default SSR-Encoder)")
    g.add_argument("--compare", nargs="*", default=[], help="metrics.json of other score runs to add to table.md")
    g.add_argument("--report-dir", default=None, help="where reports go (default: <images>/report)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True, metavar="{generate,score,all}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bench", required=True, help="DreamBench folder or multi-subject .jsonl")
    common.add_argument("--device", default="cuda" if _cuda() else "cpu")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen = sub.add_parser("generate", parents=[common], help="make the images (resumable)",
                         description="Generate SSR-Encoder images for a bench (resumable).")
    gen.add_argument("--out", required=True, help="image folder")
    _add_generate_args(gen)
    score = sub.add_parser("score", parents=[common], help="score a folder of images",
                           description="Score a folder of generated images against a bench.")
    score.add_argument("--images", required=True, help="folder of generated images (<subject>/<NN>_*.png)")
    _add_score_args(score)
    both = sub.add_parser("all", parents=[common], help="generate, then score",
                          description="Generate (resumable), then score.")
    both.add_argument("--out", required=True, help="image folder")
    _add_generate_args(both)
    _add_score_args(both)
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_generate(args, bench) -> dict:
    from .generate import GenerationSettings, build_core, run_generation

    core = build_core(args.pretrained_model, args.clip_vision, args.ssr_weights, args.sd_config_dir, args.device,
                      args.dtype, clip_expect_width=None if args.no_clip_width_check else 1024)
    settings = GenerationSettings(seeds=list(args.seeds), steps=args.steps, guidance_scale=args.guidance_scale,
                                  subject_scale=args.subject_scale, height=args.height, width=args.width,
                                  mask_weight=args.mask_weight)
    record = {"pretrained_model": os.path.basename(os.path.normpath(args.pretrained_model)),
              "ssr_weights": os.path.basename(os.path.normpath(args.ssr_weights)),
              "clip_vision": os.path.basename(os.path.normpath(args.clip_vision))}
    result = run_generation(core, bench, args.out, settings, record, progress=not args.no_progress)
    print(f"generate: {result['generated']} made, {result['skipped']} already there, {result['total']} in all -> {args.out}")
    return result


def load_scoring_models(args):
    from .loaders import load_aesthetic, load_clip, load_dino
    from .scoring import ScoringModels

    aesthetic = None
    if args.aesthetic_head or args.aesthetic_clip:
        if not (args.aesthetic_head and args.aesthetic_clip):
            raise ValueError("the aesthetic score needs both --aesthetic-head and --aesthetic-clip (CLIP ViT-L/14)")
        aesthetic = load_aesthetic(args.aesthetic_head, args.aesthetic_clip, args.aesthetic_clip_arch, args.device)
    return ScoringModels(load_clip(args.clip, args.clip_arch, args.device), load_dino(args.dino, args.device), aesthetic)


def run_score(args, bench, images_dir: str) -> dict:
    from .reports import write_reports
    from .scoring import bench_metrics, find_generated_images, score_images

    find_generated_images(bench, images_dir)  # a wrong folder is reported before models load
    models = load_scoring_models(args)
    rows = score_images(bench, images_dir, models)
    report_dir = args.report_dir or os.path.join(images_dir, "report")
    data = write_reports(report_dir, bench, rows, models.describe(), images_dir, args.method, bench_metrics(bench),
                         args.compare)
    with open(os.path.join(report_dir, "table.md"), encoding="utf-8") as f:
        print(f.read(), end="")
    print(f"score: {len(rows)} images -> {report_dir} (metrics.json, per_image.csv, table.md, contact_sheet.html)")
    return data


def main(argv: Optional[List[str]] = None) -> int:
    from ssr.files import WeightFileError

    from .benches import BenchError, load_bench

    args = build_parser().parse_args(argv)
    try:
        bench = load_bench(args.bench)
        if args.step in ("generate", "all"):
            run_generate(args, bench)
        if args.step in ("score", "all"):
            run_score(args, bench, args.images if args.step == "score" else args.out)
    except (BenchError, WeightFileError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
