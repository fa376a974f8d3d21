#!/usr/bin/env bash
# The GPU checks of issues 2 and 4 in one run, for a session that is lent a GPU machine:
#   run(command="bash bench/gpu_checks.sh", timeout_s=540)
# Installs what the benchmarks need into the machine's Python (torch is expected there),
# then prints both tables; JSON copies go to $OUT when set. Random weights: timing depends
# only on shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ssr-gpu-checks}"; mkdir -p "$OUT"
python -m pip install -q open_clip_torch safetensors diffusers transformers lightning einops omegaconf 2>&1 | tail -2
python -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== subject branch overhead (SD1.5 UNet, fp16, 30 steps, CFG) =="
timeout 300 python bench/bench_subject_attention.py --device cuda --size sd15 --json "$OUT/bench_subject_attention.json"
echo "== trainer step (SD1.5 size, batch 16, bf16) =="
timeout 200 python bench/bench_trainer.py 2>&1 | tee "$OUT/bench_trainer.txt"
