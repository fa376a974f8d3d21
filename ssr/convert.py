"""Convert SSR-Encoder weights to our single ``.safetensors`` file.

    python -m ssr.convert models/ssr_encoder/pytorch_model.bin -o models/ssr_encoder/ssr_sd15.safetensors
    python -m ssr.convert ssr_aligner.safetensors ssr_attentions.safetensors -o ssr_sd15.safetensors

Inputs: a folder with a pair, one file of a pair (its partner is found beside it), both
files of a pair, or one of our files (re-written, e.g. to fp16). Official ``.bin`` files are
read with ``weights_only`` loading: no pickled code runs.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .files import WeightFileError
from .weights import load_ssr_weights, save_ssr_weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssr.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="SSR weight file(s) or a folder holding a pair")
    parser.add_argument("-o", "--output", required=True, help="output .safetensors path")
    parser.add_argument("--half", action="store_true", help="store fp16 tensors (half the size; loads as fp32)")
    parser.add_argument("--source", default=None, help="text for the 'source' metadata field (default: input names)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error("--output must end in .safetensors")
    try:
        model = load_ssr_weights(args.inputs[0] if len(args.inputs) == 1 else args.inputs)
    except WeightFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.half:
        model = model.to(torch.float16)
    extra = {"source": args.source} if args.source else {}
    save_ssr_weights(model, args.output, extra)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {n / 1e6:.1f} M parameters, {len(model.attention)} layers, base {model.family}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
