"""What the CPU machines cannot check: NCCL, bf16 masters, DeepSpeed on GPUs. Marked ``gpu``:
skipped without CUDA (run with ``pytest -m gpu`` on a GPU machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], run_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


COMMON = ["--config", "configs/tiny-test.yaml", "--train.precision=bf16", "--schedule.epochs=3"]
# FSDP2 in bf16 refuses BatchNorm models (see check_fsdp2_mixed_precision): a ViT for it
VIT = ["--model.name=test_vit", "--model.kwargs={img_size: 32, patch_size: 4}"]


@pytest.mark.gpu
def test_single_gpu_bf16_loop(tmp_path):
    """The plain ``python train.py`` path on one GPU: loss, mask history, tickets, superposition and
    BN recalibration all on the device (each once summed into a CPU tensor here)."""
    run_dir = tmp_path / "single"
    summary = _run([sys.executable, "train.py", *COMMON, f"--experiment.output_dir={run_dir}"], run_dir)
    assert summary["parallelism"] == "single"
    assert summary["steps_completed"] == summary["plan"]["total_steps"]
    assert summary["results"]["S_2"]["density"] == pytest.approx(0.1, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_accelerate_nccl_bf16(tmp_path, engine):
    gpus = max(1, torch.cuda.device_count())
    run_dir = tmp_path / engine
    summary = _run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            f"launch/accelerate/{engine}-gpu.yaml",
            "--num_processes",
            str(gpus),
            "train.py",
            *COMMON,
            *(VIT if engine == "fsdp2" else []),
            f"--experiment.output_dir={run_dir}",
        ],
        run_dir,
    )
    assert summary["parallelism"] == engine
    assert summary["results"]["S_2"]["density"] == pytest.approx(0.1, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_bf16_masters(tmp_path, stage):
    gpus = max(1, torch.cuda.device_count())
    run_dir = tmp_path / f"zero{stage}"
    summary = _run(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(gpus),
            "train.py",
            "--deepspeed",
            f"launch/deepspeed/zero{stage}.json",
            *COMMON,
            f"--experiment.output_dir={run_dir}",
        ],
        run_dir,
    )
    assert summary["parallelism"] == "deepspeed"
    assert summary["results"]["S_2"]["density"] == pytest.approx(0.1, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("max_grad_norm", ["null", "1.0"])
def test_fp16_loss_scaler_end_to_end(tmp_path, max_grad_norm):
    """Accelerate creates a GradScaler for fp16 on a GPU: the step must let it decide on overflow
    (early fp16 steps overflow) and clip after exactly one unscale."""
    run_dir = tmp_path / "fp16"
    summary = _run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/tiny-test.yaml",
            "--train.precision=fp16",
            f"--optim.max_grad_norm={max_grad_norm}",
            "--schedule.epochs=3",
            f"--experiment.output_dir={run_dir}",
        ],
        run_dir,
    )
    assert summary["steps_completed"] == summary["plan"]["total_steps"]
    assert summary["results"]["S_2"]["density"] == pytest.approx(0.1, abs=1e-4)
