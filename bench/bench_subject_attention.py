#!/usr/bin/env python
"""Time cost of the SSR subject branch in a WebUI-like setting.

The ``ldm`` UNetModel the WebUI runs (SD1.5 config at ``--size sd15``: model_channels 320,
channel_mult (1, 2, 4, 4), 8 heads, 768-dim context, 64x64 latents), with an SDPA
cross-attention forward installed on the ``CrossAttention`` class as the WebUI's attention
optimisation does, fp16 weights + autocast on CUDA. One "generation" is ``--steps`` UNet calls
on 2 rows per image (classifier-free guidance: rows ``[0]*B + [1]*B`` = subject, then
unconditional context), each subject context 462 tokens.

Variants, timed in interleaved repetitions (the order rotates every repetition) and
summarised by the median:
  plain             no hooks at all (the baseline)
  hooks-off         branch installed but disabled (cost of the hooks alone)
  subject           branch on, subject K/V projected once per generation (cached)
  subject-uncached  branch on, K/V projected again at every step

Also prints the FLOP floor: FLOPs of the branch's unavoidable attention (each query over
the subject tokens, 16 layers) as a share of one UNet forward, both counted with
torch.utils.flop_counter on the meta device (so it costs nothing at any size). The UNet
count includes its own attention matmuls.

    python bench/bench_subject_attention.py --device cpu --size tiny --steps 3
    python bench/bench_subject_attention.py --device cuda --size sd15 --steps 30 --batch 1 4 --dtype fp16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ldm.modules.attention as ldm_attention  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

from ssr.attention import SubjectAttentionWeights, install_subject_attention  # noqa: E402
from ssr.layers import find_cross_attention_layers  # noqa: E402

SIZES = {
    "sd15": dict(model_channels=320, context_dim=768, latent=64),
    "tiny": dict(model_channels=32, context_dim=32, latent=16),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ("plain", "hooks-off", "subject", "subject-uncached")
SUBJECT_TOKENS = 462  # 6 scales x 77 query tokens per subject
TEXT_TOKENS = 77


def webui_sdpa_forward(self, x, context=None, mask=None, **kwargs):
    """SDPA cross-attention like the WebUI's optimisation: calls to_q/to_k/to_v, then
    to_out[0] and to_out[1] (so the subject branch's hooks see the usual module calls)."""
    batch = x.shape[0]
    heads = self.heads
    q_in = self.to_q(x)
    context = x if context is None else context
    k_in, v_in = self.to_k(context), self.to_v(context)
    q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q_in, k_in, v_in))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, q_in.shape[-1]).to(q_in.dtype)
    return self.to_out[1](self.to_out[0](out))


def build_unet(size: str, device="cpu") -> UNetModel:
    cfg = SIZES[size]
    with torch.device(device):
        return UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=cfg["model_channels"],
                         attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=(1, 2, 4, 4), num_heads=8,
                         use_spatial_transformer=True, transformer_depth=1, context_dim=cfg["context_dim"],
                         use_checkpoint=False, legacy=False).eval().requires_grad_(False)


def subject_weights(unet, context_dim: int, device="cpu") -> SubjectAttentionWeights:
    widths = [m.to_q.out_features for _, m in find_cross_attention_layers(unet)]
    with torch.device(device):
        return SubjectAttentionWeights(widths, context_dim).requires_grad_(False)


# ----------------------------------------------------------------------------- FLOPs

def flop_floor(size: str, subjects: int) -> Dict[str, float]:
    """Per UNet row, on the meta device: UNet forward, the branch's attention (analytic, from
    the query lengths seen by each attn2), the installed branch as measured (second call, K/V
    cached), and the per-generation K/V projection."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = SIZES[size]
    unet = build_unet(size, "meta")
    weights = subject_weights(unet, cfg["context_dim"], "meta")
    m = SUBJECT_TOKENS * subjects
    with torch.device("meta"):
        x = torch.randn(1, 4, cfg["latent"], cfg["latent"])
        t = torch.ones(1)
        ctx = torch.randn(1, TEXT_TOKENS, cfg["context_dim"])
        tokens = torch.randn(1, m, cfg["context_dim"])
    queries = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: queries.append((args[0].shape[1], mod.to_q.out_features)))
             for _, layer in find_cross_attention_layers(unet)]
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        unet(x, timesteps=t, context=ctx)
    for h in hooks:
        h.remove()
    handle = install_subject_attention(unet, weights)
    handle.set_context(tokens)
    with torch.no_grad():
        unet(x, timesteps=t, context=ctx)  # projects and caches K/V
        with FlopCounterMode(display=False) as branch:
            unet(x, timesteps=t, context=ctx)
    handle.remove()
    unet_flops = plain.get_total_flops()
    attention = sum(4 * n * m * c for n, c in queries)  # Q K_S^T and A V_S, 2 FLOP per MAC
    projection = sum(2 * 2 * m * cfg["context_dim"] * c for _, c in queries)
    return {"unet_gflop": unet_flops / 1e9, "branch_attention_gflop": attention / 1e9,
            "branch_measured_gflop": (branch.get_total_flops() - unet_flops) / 1e9,
            "kv_projection_gflop_per_context": projection / 1e9, "floor_percent": 100.0 * attention / unet_flops}


# ----------------------------------------------------------------------------- timing

class Runner:
    """One UNet + SSR weights on a device; runs timed generations of each variant."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        cfg = SIZES[args.size]
        self.cfg = cfg
        torch.manual_seed(0)
        # The WebUI's fp16 setting: half weights + autocast. ldm's GroupNorm32 runs in fp32 on a
        # half model only where autocast casts group_norm's weights (CUDA), so CPU runs in bf16
        # keep fp32 weights and rely on autocast alone.
        weight_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        self.unet = build_unet(args.size).to(self.device, weight_dtype)
        self.weights = subject_weights(self.unet, cfg["context_dim"]).to(self.device, weight_dtype)
        self.tokens = torch.randn(2, SUBJECT_TOKENS * args.subjects, cfg["context_dim"], device=self.device)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generation(self, variant: str, batch: int) -> float:
        """Seconds for one generation (``steps`` UNet calls on 2*batch rows)."""
        g = torch.Generator(device="cpu").manual_seed(batch)
        cfg = self.cfg
        x = torch.randn(2 * batch, 4, cfg["latent"], cfg["latent"], generator=g).to(self.device)
        context = torch.randn(2 * batch, TEXT_TOKENS, cfg["context_dim"], generator=g).to(self.device)
        timesteps = torch.linspace(999, 1, self.args.steps).tolist()
        handle = None
        if variant != "plain":
            handle = install_subject_attention(self.unet, self.weights, scale=self.args.scale)
            handle.enabled = variant != "hooks-off"
        try:
            self.sync()
            start = time.perf_counter()
            with torch.no_grad(), self.autocast():
                if handle is not None:
                    handle.set_context(self.tokens)  # per generation, as the extension does
                    handle.set_rows([0] * batch + [1] * batch)
                for step in timesteps:
                    if variant == "subject-uncached":
                        handle.set_context(self.tokens)  # drops the K/V cache
                    t = torch.full((2 * batch,), step, device=self.device)
                    eps = self.unet(x, timesteps=t, context=context)
                    x = x - 0.01 * eps.to(x.dtype)  # keep steps dependent, like a sampler
            self.sync()
            return time.perf_counter() - start
        finally:
            if handle is not None:
                handle.remove()


def run_timings(runner: Runner, variants: List[str]) -> List[dict]:
    args = runner.args
    rows = []
    for batch in args.batch:
        for v in variants:  # warm-up: kernels, allocator, autotuning
            for _ in range(args.warmup):
                runner.generation(v, batch)
        times: Dict[str, List[float]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                times[v].append(runner.generation(v, batch))
        base = statistics.median(times["plain"]) if "plain" in times else None
        for v in variants:
            med = statistics.median(times[v])
            rows.append({
                "batch": batch, "variant": v, "s_per_generation": med, "s_per_image": med / batch,
                "ratio": med / base if base else None,
                "overhead_percent": 100.0 * (med / base - 1.0) if base else None,
                "spread_percent": 100.0 * (max(times[v]) - min(times[v])) / med, "times": times[v],
            })
    return rows


def print_table(rows: List[dict]) -> None:
    print(f"{'images':>6} {'variant':<17} {'s/image':>9} {'ratio':>7} {'overhead':>9} {'spread':>7}")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        over = f"{r['overhead_percent']:+.1f}%" if r["overhead_percent"] is not None else "-"
        print(f"{r['batch']:>6} {r['variant']:<17} {r['s_per_image']:>9.4f} {ratio:>7} {over:>9} {r['spread_percent']:>6.0f}%")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--steps", type=int, default=30, help="UNet calls per generation")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="images per generation (2 rows each)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed generations per variant and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations per variant first")
    parser.add_argument("--subjects", type=int, default=1, help="subjects per generation (462 tokens each)")
    parser.add_argument("--scale", type=float, default=1.0, help="lambda of the branch")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default on --device cpu: 1, which keeps timings stable on "
                             "shared machines; on cuda: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    args.variants = [v for v in VARIANTS if v in args.variants]

    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"device {args.device} ({name}), torch {torch.__version__}, {args.dtype}, size {args.size}, "
          f"{SIZES[args.size]['latent']}x{SIZES[args.size]['latent']} latents, {args.steps} steps, "
          f"{args.subjects} subject(s) = {SUBJECT_TOKENS * args.subjects} tokens, CFG 2 rows per image, "
          f"{args.repeats} interleaved repeats (median), {torch.get_num_threads()} CPU thread(s)")
    result = {"args": vars(args), "device_name": name, "torch": torch.__version__}
    if not args.no_flops:
        flops = flop_floor(args.size, args.subjects)
        result["flops"] = flops
        print(f"FLOPs per UNet row: UNet {flops['unet_gflop']:.1f} G (incl. its attention matmuls); "
              f"subject attention {flops['branch_attention_gflop']:.2f} G = floor {flops['floor_percent']:.2f}%; "
              f"installed branch measured {flops['branch_measured_gflop']:.2f} G; "
              f"K/V projection {flops['kv_projection_gflop_per_context']:.2f} G per context and generation")

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the WebUI does
        torch.backends.cudnn.allow_tf32 = True
    original_forward = ldm_attention.CrossAttention.forward
    ldm_attention.CrossAttention.forward = webui_sdpa_forward
    try:
        rows = run_timings(Runner(args), args.variants)
    finally:
        ldm_attention.CrossAttention.forward = original_forward
    result["timings"] = rows
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
