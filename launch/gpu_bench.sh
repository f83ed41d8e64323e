#!/usr/bin/env bash
# GPU benchmark (one GPU, under 10 minutes): writes runs/gpu-bench/BENCH.md with
#  1. the model-step throughput table: bf16, ResNet-50 and ViT-S/16 at 224, the largest power-of-two
#     batch that fits, dense vs sparse_sup masks (goal: sparse_sup / dense <= 1.01);
#  2. a short CIFAR-10 comparison: ResNet-18 (CIFAR stem) RigL vs RigL + Sup-tickets, bf16, the
#     decoded images kept on the GPU (20 epochs each by default).
# Copy the tables into docs/BENCHMARKS.md with the date and the GPU.
# Usage: [PYTHON=python3] [BUDGET=570 seconds] bash launch/gpu_bench.sh [cifar10 folder] [epochs]      (CPU check of the Python parts:
#        python bench/gpu_throughput.py --smoke && python bench/gpu_cifar.py --smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/cifar10}
epochs=${2:-20}
out=runs/gpu-bench
mkdir -p "$out"
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
start=$(date +%s)
# 1. throughput (~2-3 min: batch probing, warm-up, 5 rounds x 10 steps per variant and model)
timeout 300 "$py" bench/gpu_throughput.py --models resnet50 vit_small --rounds 5 --steps 10 \
  | tee "$out/throughput.md" || echo "(throughput stopped early: exit $?)" | tee -a "$out/throughput.md"
# 2. CIFAR-10 ResNet-18, RigL vs RigL + Sup-tickets (what is left of the 10 minutes)
left=$(( ${BUDGET:-570} - ($(date +%s) - start) )); (( left > 120 )) || left=120
timeout "$left" "$py" bench/gpu_cifar.py --data "$data" --epochs "$epochs" --out "$out/cifar" \
  | tee "$out/cifar.md" || echo "(CIFAR comparison stopped early: exit $?)" | tee -a "$out/cifar.md"
{ echo "# GPU benchmark, $(date -u '+%Y-%m-%d %H:%M') UTC, $(cat "$out/gpu.txt")"; echo;
  cat "$out/throughput.md"; echo; cat "$out/cifar.md"; } > "$out/BENCH.md"
echo "wrote $out/BENCH.md in $(( $(date +%s) - start )) s"
