"""Convert SSR-Encoder weights between our single ``.safetensors`` file, the official pair and
the safetensors re-export pair, or OpenAI's TorchScript CLIP (``ViT-L-14.pt``) to a
safetensors CLIP vision file.

From the WebUI folder (the extension's ``convert.py`` puts its own folder on ``sys.path``):

    python extensions/sd-webui-ssr-encoder/convert.py models/ssr_encoder/ssr_release -o models/ssr_encoder/ssr_sd15.safetensors
    python extensions/sd-webui-ssr-encoder/convert.py ssr_aligner.safetensors ssr_attentions.safetensors -o ssr_sd15.safetensors
    python extensions/sd-webui-ssr-encoder/convert.py --trust-torchscript ViT-L-14.pt -o models/clip_vision/ViT-L-14.safetensors
    python -m ssr.convert ssr-last.safetensors --to official -o ssr_release_official
    python -m ssr.convert ssr_release_official --to reexport -o ssr_release_safetensors

(``python -m ssr.convert ...`` does the same from inside the extension folder.)

SSR inputs: a folder with a pair, one file of a pair (its partner is found beside it), both
files of a pair, or one of our files (re-written, e.g. to fp16). ``--to`` picks the output:
``single`` (default; ``-o`` is a .safetensors file), ``official`` (``-o`` is a folder that gets
``pytorch_model.bin`` + ``pytorch_model_1.bin``) or ``reexport`` (a folder that gets
``ssr_aligner.safetensors`` + ``ssr_attentions.safetensors``). Weights that are not SD1.x
shaped (tiny test models, other widths) are refused unless ``--any-family`` is given.
Official ``.bin`` files are read with ``weights_only`` loading: no pickled code runs. TorchScript archives are refused
unless ``--trust-torchscript`` is given, because loading one runs code stored in the file.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Dict, List, Optional

import torch

from .clip_checkpoints import detect_clip_layout, infer_vision_config
from .files import CONVERT_COMMAND, WeightFileError, is_torchscript_archive, torchscript_refusal, write_atomically
from .weights import (EXPORT_FORMATS, PAIR_NAMES, WrongFamilyError, export_ssr_weights,
                      family_problem, layer_count_problem, load_ssr_weights)

TRUST_HELP = (
    "allow reading TorchScript archives (OpenAI's ViT-L-14.pt) and convert one into a .safetensors CLIP "
    "vision file. RISK: loading a TorchScript archive runs code stored in the file (torch.jit.load), with "
    "your user's rights; use it only on a file from a source you trust (e.g. OpenAI's own download), once. "
    "The .safetensors result loads without running anything.")


def load_torchscript_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """``torch.jit.load`` a TorchScript archive and return its tensors. This RUNS CODE from
    the file: only the converter calls it, and only with ``--trust-torchscript``."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit", category=FutureWarning)
            module = torch.jit.load(path, map_location="cpu")
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise WeightFileError(f"{path}: cannot load TorchScript archive ({e})") from e


def convert_torchscript_clip(path: str, output: str, half: bool = False,
                             source: Optional[str] = None) -> int:
    """TorchScript CLIP (OpenAI layout: the vision tower under ``visual.``, open_clip names)
    -> ``output`` with the ``visual.*`` tensors only (text tower dropped). -> tensor count."""
    from safetensors.torch import save_file

    sd = load_torchscript_state_dict(path)
    layout, prefix = detect_clip_layout(sd)
    if layout != "open_clip":
        raise WeightFileError(f"{path}: not a CLIP vision TorchScript archive (no 'visual.conv1.weight'; "
                              f"first keys: {', '.join(sorted(sd)[:4])})")
    visual = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    visual = {k: v for k, v in visual.items() if k.split(".")[0] in _VISUAL_PARTS}
    try:
        config = infer_vision_config(visual)
    except (KeyError, ValueError) as e:
        raise WeightFileError(f"{path}: incomplete CLIP vision tower, missing {e}") from e
    tensors = {"visual." + k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in visual.items()}
    metadata = {"format": "clip-vision", "layout": "open_clip", "width": str(config.width),
                "layers": str(config.layers), "source": source or os.path.basename(path)}
    write_atomically(output, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return len(tensors)


# open_clip VisionTransformer parameter groups (a bare visual tower has only these).
_VISUAL_PARTS = {"class_embedding", "positional_embedding", "conv1", "ln_pre", "transformer", "ln_post", "proj"}


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m ssr.convert", description=__doc__.split("\n\n")[0],
                                     epilog="Examples (from the WebUI folder):\n  " + "\n  ".join(
                                         line.strip() for line in __doc__.splitlines() if line.strip().startswith("python ")),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="SSR weight file(s) or a folder holding a pair; or, with "
                                                  "--trust-torchscript, one TorchScript CLIP file")
    parser.add_argument("-o", "--output", required=True,
                        help="output: a .safetensors file for --to single, a folder for --to official/reexport")
    parser.add_argument("--to", choices=EXPORT_FORMATS, default="single",
                        help="output format: single (our one .safetensors file, default), official (the authors' "
                             f"{' + '.join(PAIR_NAMES[0])}), reexport ({' + '.join(PAIR_NAMES[1])}, the layout "
                             "the ComfyUI port loads)")
    parser.add_argument("--half", action="store_true", help="store fp16 tensors (half the size; loads as fp32)")
    parser.add_argument("--source", default=None, help="text for the 'source' metadata field (default: input names)")
    parser.add_argument("--any-family", action="store_true",
                        help="convert weights that are not SD1.x shaped (another text width or layer count, e.g. a "
                             "tiny test model) instead of refusing them; the WebUI extension will not load them")
    parser.add_argument("--trust-torchscript", action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    if args.to == "single" and not args.output.endswith(".safetensors"):
        parser.error("--output must end in .safetensors (or give --to official / --to reexport and a folder)")
    if args.to != "single" and (os.path.isfile(args.output) or args.output.endswith((".safetensors", ".bin"))):
        parser.error(f"--to {args.to} writes two files: --output must be a folder")
    try:
        scripted = [p for p in args.inputs if os.path.isfile(p) and is_torchscript_archive(p)]
        if scripted and not args.trust_torchscript:
            raise WeightFileError(torchscript_refusal(scripted[0]).replace(CONVERT_COMMAND, parser.prog))
        if scripted:
            if len(args.inputs) != 1 or args.to != "single":
                parser.error("--trust-torchscript converts one TorchScript file at a time, to one .safetensors file")
            count = convert_torchscript_clip(scripted[0], args.output, args.half, args.source)
            print(f"wrote {args.output}: CLIP vision tower, {count} tensors (from TorchScript {scripted[0]})")
            return 0
        source = args.inputs[0] if len(args.inputs) == 1 else args.inputs
        model = load_ssr_weights(source, expect_family=None if args.any_family else "sd1")
    except WeightFileError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, WrongFamilyError):
            print("(to convert weights of another shape anyway, e.g. from a tiny test run, add --any-family)",
                  file=sys.stderr)
        return 2
    if args.any_family:
        problems = [p for p in (family_problem(model.attention.context_dim),
                                layer_count_problem(len(model.attention))) if p]
        for problem in problems:
            print(f"warning: --any-family: {problem}; converting anyway, the WebUI extension will refuse "
                  "the result", file=sys.stderr)
    if args.half:
        model = model.to(torch.float16)
    extra = {"source": args.source} if args.source else {}
    paths = export_ssr_weights(model, args.to, args.output, extra)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {' + '.join(paths)}: {n / 1e6:.1f} M parameters, {len(model.attention)} layers, "
          f"base {model.family}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
