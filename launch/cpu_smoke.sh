#!/usr/bin/env bash
# CPU smoke recipe: one process, then DDP and FSDP2 over 2 gloo processes, on the tiny config.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=${1:-runs/smoke}
python train.py --config configs/tiny-test.yaml --experiment.output_dir="$out/single" --experiment.overwrite=true
for engine in ddp fsdp2; do
  accelerate launch --config_file "launch/accelerate/$engine-cpu.yaml" train.py \
    --config configs/tiny-test.yaml --experiment.output_dir="$out/$engine" --experiment.overwrite=true
done
