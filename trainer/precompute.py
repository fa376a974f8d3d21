"""Precompute training shards: VAE latents of both flips, the CLIP view and, optionally, the
text embeddings of caption and query, so training neither decodes images nor runs the VAE.

    python -m trainer.precompute --pretrained_model models/v1-5-pruned-emaonly.safetensors \\
        --train_jsonl data/train.jsonl --output data/precomputed --workers 8
    python -m trainer.precompute --pretrained_model ... --train_shards "/data/laion/{00000..04095}.tar" \\
        --output /data/laion-precomputed --workers 16 --devices cuda:0,cuda:1

Then train with ``data.train_precomputed: data/precomputed/{00000..NNNNN}.tar`` (printed at
the end). Layout of the shards: ``trainer.precomputed_format``.

Work is cut into output shards: JSONL rows [i*n, (i+1)*n) (n = --samples_per_shard) make
shard i; with input shards, input shard i makes output shard i. Worker processes (each with
its own VAE and text encoder on one of --devices) take shards in turn; a shard is written
under a temporary name and renamed when whole, so running the same command again after an
interruption skips the finished shards and redoes the rest. Progress (shards, samples/s,
ETA) is printed every --progress_every seconds as plain lines, fit for log files.
Unusable rows are skipped and counted per reason, as in training.
"""
from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import time
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ssr.image_encoder import clip_view_pixels

from .jsonl_dataset import JsonlImageTextDataset
from .samples import sd_view
from .skips import SkipSample
from .webdataset_stream import WebDatasetImageText, expand_shards
from .precomputed_format import FORMAT_NAME, FORMAT_VERSION, SETTINGS, read_manifest, settings_mismatch, write_manifest
from .precomputed_writer import ShardWriter, shard_is_complete, stats_path

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- work units


class WorkPlan:
    """What each output shard holds: rows of a JSONL file or one input shard."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.train_jsonl:
            self.rows = len(self._jsonl())
            self.units = math.ceil(self.rows / args.samples_per_shard)
            self.input_shards: List[str] = []
        else:
            self.input_shards = expand_shards(args.train_shards)
            self.units = len(self.input_shards)
            self.rows = None

    def _jsonl(self) -> JsonlImageTextDataset:
        a = self.args
        return JsonlImageTextDataset(a.train_jsonl, a.image_root, transform=None, seed=0,
                                     max_image_pixels=a.max_image_pixels)

    def samples_in(self, unit: int) -> Optional[int]:
        """Rows in one unit (JSONL), None when unknown (input shards)."""
        if self.rows is None:
            return None
        n = self.args.samples_per_shard
        return min(self.rows, (unit + 1) * n) - unit * n

    def records(self, unit: int, skip) -> Iterator[Tuple[Any, str, str, str]]:
        """-> (RGB image, caption, query, source name) of the unit's usable rows; ``skip``
        is called with each SkipSample."""
        a = self.args
        if self.rows is not None:
            dataset = self._jsonl()
            n = a.samples_per_shard
            for row in range(unit * n, min(self.rows, (unit + 1) * n)):
                try:
                    yield dataset.read_row(row)
                except SkipSample as exc:
                    skip(exc)
            return
        from webdataset.tariterators import tarfile_samples

        url = self.input_shards[unit]
        reader = WebDatasetImageText([url], transform=None, seed=0, max_image_pixels=a.max_image_pixels)

        def handler(exc: Exception) -> bool:
            skip(SkipSample("tar_read_error", f"{url}: {exc}"))
            return True

        for raw in tarfile_samples([{"url": url}], handler=handler):
            try:
                image, caption, query = reader.decode(raw)
            except SkipSample as exc:
                skip(exc)
                continue
            yield image, caption, query, f"{url}/{raw['__key__']}"


def shard_path(output: str, unit: int) -> str:
    return os.path.join(output, f"{unit:05d}.tar")


def shard_pattern(output: str, units: int) -> str:
    return os.path.join(output, f"{{00000..{units - 1:05d}}}.tar")


# ----------------------------------------------------------------------------- encoding


class Encoder:
    """The frozen models a worker needs (VAE, and the text encoder with --text_embeddings)
    on one device."""

    def __init__(self, args: argparse.Namespace, device: str):
        from .sd_loading import load_stable_diffusion

        sd = load_stable_diffusion(args.pretrained_model, args.sd_config_dir)
        self.device = torch.device(device)
        dtype = DTYPES[args.vae_dtype]
        self.vae = sd.vae.to(self.device).eval()
        if dtype != torch.float32:
            self.vae.to(dtype)
        self.text_encoder = sd.text_encoder.to(self.device).eval() if args.text_embeddings else None
        self.tokenize = sd.tokenize
        self.latent_dtype = DTYPES[args.latent_dtype]
        self.resolution, self.clip_resolution = args.resolution, args.clip_resolution
        del sd  # the UNet is not needed here

    @torch.no_grad()
    def encode(self, images: Sequence[Any], captions: Sequence[str], queries: Sequence[str]) -> List[Dict[str, torch.Tensor]]:
        """B RGB images with their texts -> B tensor dicts (layout: trainer.precomputed_format)."""
        from ssr.query_encoder import encode_query_tokens

        b = len(images)
        views = torch.stack([sd_view(image, self.resolution) for image in images])        # [B, 3, R, R]
        both = torch.cat([views, views.flip(-1)]).to(self.device, self.vae.dtype)          # [2B, 3, R, R]
        dist = self.vae.encode(both).latent_dist
        mean = dist.mean.to("cpu", self.latent_dtype)                                      # [2B, 4, R/8, R/8]
        std = dist.std.to("cpu", self.latent_dtype)
        out = []
        for i, image in enumerate(images):
            out.append({"latent_mean": torch.stack([mean[i], mean[b + i]]),
                        "latent_std": torch.stack([std[i], std[b + i]]),
                        "clip_pixels": clip_view_pixels(image, self.clip_resolution)})
        if self.text_encoder is not None:
            texts = list(captions) + list(queries)
            unique = list(dict.fromkeys(texts))
            states = encode_query_tokens(self.text_encoder, self.tokenize(unique), self.device)
            states = states.to("cpu", torch.float16)
            for i in range(b):
                out[i]["caption_states"] = states[unique.index(captions[i])]
                out[i]["query_states"] = states[unique.index(queries[i])]
        return out


def write_unit(plan: WorkPlan, encoder: Encoder, unit: int, output: str, batch_size: int, report) -> Tuple[int, Dict[str, int]]:
    """Write output shard ``unit``; ``report(n)`` after every n samples written.
    -> (samples written, {skip reason: count})."""
    with ShardWriter(shard_path(output, unit), unit) as writer:
        pending: List[Tuple[Any, str, str, str]] = []

        def flush() -> None:
            if not pending:
                return
            encoded = encoder.encode([p[0] for p in pending], [p[1] for p in pending], [p[2] for p in pending])
            for (_, caption, query, source), tensors in zip(pending, encoded):
                writer.add(caption, query, source, tensors)
            report(len(pending))
            pending.clear()

        for record in plan.records(unit, lambda skip: writer.skip(skip.reason)):
            pending.append(record)
            if len(pending) == batch_size:
                flush()
        flush()
        return writer.count, dict(writer.skipped)


# ----------------------------------------------------------------------------- processes


def worker_main(args: argparse.Namespace, device: str, units: List[int], messages) -> None:
    """One worker process: encode ``units`` on ``device``; messages go to the main process."""
    try:
        torch.set_num_threads(max(1, args.threads_per_worker))
        plan = WorkPlan(args)
        encoder = Encoder(args, device)
        for unit in units:
            if shard_is_complete(shard_path(args.output, unit)):
                continue
            count, skipped = write_unit(plan, encoder, unit, args.output, args.batch_size,
                                        lambda n: messages.put(("samples", n)))
            messages.put(("shard", unit, count, skipped))
        messages.put(("finished", device))
    except BaseException as exc:  # noqa: BLE001 - reported to the main process, which stops the run
        import traceback

        messages.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def default_devices() -> List[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Plain progress lines: shards done, samples, samples/s, ETA."""

    def __init__(self, plan: WorkPlan, todo: List[int], every: float, out=None):
        self.plan, self.todo, self.every = plan, todo, every
        self.out = out if out is not None else sys.stdout
        self.start = self.last_print = time.monotonic()
        self.samples = 0
        self.shards = 0
        self.skipped: Counter = Counter()
        known = [plan.samples_in(u) for u in todo]
        self.expected = None if any(k is None for k in known) else sum(known)

    def line(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self.start)
        rate = self.samples / elapsed
        if self.expected is not None and rate > 0:
            eta = format_duration(max(0, self.expected - self.samples - sum(self.skipped.values())) / rate)
        elif self.shards:
            eta = format_duration(elapsed / self.shards * (len(self.todo) - self.shards))
        else:
            eta = "?"
        skipped = f", {sum(self.skipped.values())} skipped" if self.skipped else ""
        return (f"precompute: {self.shards}/{len(self.todo)} shards, {self.samples} samples{skipped}, "
                f"{rate:.1f} samples/s, elapsed {format_duration(elapsed)}, ETA {eta}")

    def maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_print >= self.every:
            print(self.line(), file=self.out, flush=True)
            self.last_print = now


def run(args: argparse.Namespace) -> int:
    from .core import vae_identity, weights_identity
    from .sd_loading import load_stable_diffusion

    plan = WorkPlan(args)
    os.makedirs(args.output, exist_ok=True)
    sd = load_stable_diffusion(args.pretrained_model, args.sd_config_dir)
    settings = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "resolution": args.resolution,
        "clip_resolution": args.clip_resolution, "vae": vae_identity(sd.vae),
        "text_encoder": weights_identity(sd.text_encoder, "text") if args.text_embeddings else None,
        "latent_dtype": args.latent_dtype, "source": os.path.abspath(args.train_jsonl or "") if args.train_jsonl
        else args.train_shards, "image_root": args.image_root, "samples_per_shard": args.samples_per_shard,
        "base_model": sd.source, "vae_dtype": args.vae_dtype,
    }
    del sd
    existing = read_manifest(args.output)
    if existing is not None:
        mismatch = settings_mismatch(existing, settings)
        if mismatch:
            details = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in ((k, *v) for k, v in mismatch.items()))
            print(f"error: {args.output} holds shards precomputed with other settings ({details}); use another "
                  "--output folder or the same settings", file=sys.stderr)
            return 2
    write_manifest(args.output, {**settings, "shards": plan.units, "complete": False})

    todo = [u for u in range(plan.units) if not shard_is_complete(shard_path(args.output, u))]
    devices = args.devices.split(",") if args.devices else default_devices()
    workers = min(args.workers, len(todo))
    where = "in this process" if args.workers == 0 else f"with {workers} worker process(es)"
    print(f"precompute: {plan.units} shards into {args.output}, {plan.units - len(todo)} already done, "
          f"{len(todo)} to do {where} on {', '.join(devices[:max(1, workers)])}", flush=True)
    progress = Progress(plan, todo, args.progress_every)
    failed = None

    def handle(message) -> None:
        nonlocal failed
        kind = message[0]
        if kind == "samples":
            progress.samples += message[1]
        elif kind == "shard":
            progress.shards += 1
            progress.skipped.update(message[3])
        elif kind == "error":
            failed = message[1]
        progress.maybe_print()

    class Inline:
        put = staticmethod(handle)

    if todo and args.workers == 0:
        worker_main(args, devices[0], todo, Inline())
    elif todo:
        import multiprocessing

        # CUDA cannot be used in forked children; on CPU, fork starts workers without
        # importing everything again.
        cpu_only = all(d.startswith("cpu") for d in devices[:workers])
        method = "fork" if cpu_only and "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        messages = context.Queue()
        processes = [context.Process(target=worker_main, daemon=True,
                                     args=(args, devices[i % len(devices)], todo[i::workers], messages))
                     for i in range(workers)]
        for process in processes:
            process.start()
        running = len(processes)
        while running and failed is None:
            try:
                message = messages.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    failed = "a worker process ended without reporting (killed? out of memory?)"
                progress.maybe_print()
                continue
            if message[0] == "finished":
                running -= 1
            handle(message)
        for process in processes:
            if failed is not None and process.is_alive():
                process.terminate()
            process.join()
    progress.maybe_print(force=True)
    if failed is not None:
        print(f"error: precompute stopped: {failed}\nRun the same command again to continue; finished shards "
              "are kept.", file=sys.stderr)
        return 1
    totals, skipped = 0, Counter()
    import json

    for unit in range(plan.units):
        with open(stats_path(shard_path(args.output, unit)), encoding="utf-8") as f:
            stats = json.load(f)
        totals += stats["samples"]
        skipped.update(stats["skipped"])
    write_manifest(args.output, {**settings, "shards": plan.units, "complete": True, "samples": totals,
                                 "skipped": dict(skipped)})
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    print(f"precompute: done, {totals} samples in {plan.units} shards (skipped: {reasons})\n"
          f"train with: data.train_precomputed: {shard_pattern(args.output, plan.units)}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.precompute", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--pretrained_model", required=True, help="SD 1.x model, as model.pretrained_model of the trainer")
    p.add_argument("--sd_config_dir", default=None, help="architecture configs, as model.sd_config_dir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_jsonl", help="JSONL rows {file_name, text, query?}, as data.train_jsonl")
    source.add_argument("--train_shards", help="img2dataset shards, as data.train_shards")
    p.add_argument("--image_root", default=None, help="folder of the JSONL's file names (default: its folder)")
    p.add_argument("--output", required=True, help="folder for the shards and precompute.json")
    p.add_argument("--samples_per_shard", type=int, default=1000, help="JSONL rows per output shard")
    p.add_argument("--resolution", type=int, default=512, help="SD view side, as data.resolution")
    p.add_argument("--clip_resolution", type=int, default=224, help="CLIP view side, as data.clip_resolution")
    p.add_argument("--text_embeddings", action="store_true",
                   help="also store the text encoder's states of caption and query (saves the text encoder at "
                        "training time; ~230 KB more per sample at SD1.x size)")
    p.add_argument("--latent_dtype", choices=("float16", "float32"), default="float16",
                   help="stored latent mean/std (float16: half the size, what the latent cache keeps)")
    p.add_argument("--vae_dtype", choices=sorted(DTYPES), default="float32", help="VAE compute dtype")
    p.add_argument("--batch_size", type=int, default=16, help="images per VAE call (each encoded twice, flipped)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads the VAE on its device); "
                                                          "0 encodes in this process")
    p.add_argument("--devices", default=None, help="comma-separated devices for the workers, in turn "
                                                   "(default: every CUDA device, else cpu)")
    p.add_argument("--threads_per_worker", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--max_image_pixels", type=int, default=89_478_485, help="as data.max_image_pixels")
    p.add_argument("--progress_every", type=float, default=30.0, help="seconds between progress lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    for name in ("samples_per_shard", "resolution", "clip_resolution", "batch_size"):
        if getattr(args, name) < 1:
            parser().error(f"--{name} must be a positive integer")
    if args.workers < 0:
        parser().error("--workers must be >= 0 (0: encode in this process)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
