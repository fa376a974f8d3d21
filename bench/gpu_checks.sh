#!/usr/bin/env bash
# The GPU checks of issues 2, 4 and 11 in one run, for a session that is lent a GPU machine:
#   run(command="bash bench/gpu_checks.sh", timeout_s=580)          # everything
#   run(command="bash bench/gpu_checks.sh data", timeout_s=400)     # issue 11 item 7 only
# Installs what the benchmarks need into the machine's Python (torch is expected there),
# then prints the tables; copies go to $OUT when set. Random weights: timing depends only
# on shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ssr-gpu-checks}"; mkdir -p "$OUT"
PART="${1:-all}"
python -m pip install -q open_clip_torch safetensors diffusers transformers lightning webdataset einops omegaconf 2>&1 | tail -2
python -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
if [ "$PART" = all ]; then
  echo "== subject branch overhead (SD1.5 UNet, fp16, 30 steps, CFG) =="
  timeout 200 python bench/bench_subject_attention.py --device cuda --size sd15 --json "$OUT/bench_subject_attention.json"
  echo "== trainer step (SD1.5 size, batch 16, bf16) =="
  timeout 150 python bench/bench_trainer.py --steps 5 2>&1 | tee "$OUT/bench_trainer.txt"
fi
echo "== data path: raw images vs precomputed shards, loader on CPU and the full step on the GPU (issue 11 item 7) =="
# Target: >= 80 samples/s at batch 16 from the shard loader, matching the step alone.
timeout 300 python bench/bench_data.py --train-step --workers 8 --samples 256 --cpu_workers 0 1 4 --steps 20 \
  2>&1 | grep -v Warning | tee "$OUT/bench_data.txt"
