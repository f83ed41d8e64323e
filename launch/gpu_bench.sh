#!/usr/bin/env bash
# GPU benchmark (one GPU, under 10 minutes): writes runs/gpu-bench/BENCH.md with
#  1. the whole-loop comparison (issue 19, first: its goals are what this is for): the sparse_sup
#     training loop (bf16, channels_last, torch.compile, data.on_device) at density 1.0 and RigL 0.1
#     against a plain compiled PyTorch loop, CIFAR ResNet-18 and ViT-S at 32 px, batch 256
#     (goals: whole loop / plain <= 1.05 dense, <= 1.10 sparse);
#  2. the model-step throughput table: bf16, ResNet-50 and ViT-S/16 at 224, the largest power-of-two
#     batch that fits, dense vs sparse_sup masks (goal: sparse_sup / dense <= 1.01);
#  3. a short CIFAR-10 comparison: ResNet-18 (CIFAR stem) RigL vs RigL + Sup-tickets, bf16, the
#     decoded images kept on the GPU (20 epochs each by default), in what is left of BUDGET.
# Each part is stopped by a timeout; the tables printed up to then are kept.
# Copy the tables into docs/BENCHMARKS.md with the date and the GPU.
# Usage: [PYTHON=python3] [BUDGET=570 seconds] bash launch/gpu_bench.sh [cifar10 folder] [epochs]      (CPU check of the Python parts:
#        python bench/gpu_throughput.py --smoke && python bench/gpu_throughput.py --loop --smoke
#        && python bench/gpu_cifar.py --smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/cifar10}
epochs=${2:-20}
out=runs/gpu-bench
mkdir -p "$out"
py=${PYTHON:-python3}
budget=${BUDGET:-570}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
# 1. whole loop (~3-4 min: torch.compile of 3 loops per model, then 1 + 5 windows of 100 steps each)
timeout 240 "$py" bench/gpu_throughput.py --loop --models resnet18 vit_small --rounds 5 --steps 100 \
  | tee "$out/loop.md" || echo "(loop comparison stopped early: exit $?)" | tee -a "$out/loop.md"
# 2. model-step throughput (~2-3 min: batch probing, warm-up, 5 rounds x 10 steps per variant and
#    model), keeping 150 s for the CIFAR comparison
t=$(( $(left) - 150 )); (( t < 180 )) || t=180; (( t > 60 )) || t=60
timeout "$t" "$py" bench/gpu_throughput.py --models resnet50 vit_small --rounds 5 --steps 10 \
  | tee "$out/throughput.md" || echo "(throughput stopped early: exit $?)" | tee -a "$out/throughput.md"
# 3. CIFAR-10 ResNet-18, RigL vs RigL + Sup-tickets (what is left of the budget)
t=$(left); (( t > 120 )) || t=120
timeout "$t" "$py" bench/gpu_cifar.py --data "$data" --epochs "$epochs" --out "$out/cifar" \
  | tee "$out/cifar.md" || echo "(CIFAR comparison stopped early: exit $?)" | tee -a "$out/cifar.md"
{ echo "# GPU benchmark, $(date -u '+%Y-%m-%d %H:%M') UTC, $(cat "$out/gpu.txt")"; echo;
  cat "$out/loop.md"; echo; cat "$out/throughput.md"; echo; cat "$out/cifar.md"; } > "$out/BENCH.md"
echo "wrote $out/BENCH.md in $(( $(date +%s) - start )) s"
