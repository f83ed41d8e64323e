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
# a LayerNorm model for FSDP2 bf16 (BatchNorm models: test_fsdp2_bf16_batchnorm_units below)
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


# ---- issue 19: compile, no host syncs, FSDP2 + bf16 + BatchNorm (prepared on CPU, not yet run) ----
SYNC_ARGS = [
    "--config",
    "configs/tiny-test.yaml",
    "--train.max_steps=16",
    "--sparse.update_interval=8",
    "--train.log_every=8",
    "--train.nonfinite_steps=[5]",  # one step skipped on the device among the guarded ones
    "--train.precision=bf16",
]


def _worker(cmd_prefix: list[str], out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SYNC_CUDA_ERROR": "1"}
    cmd = [*cmd_prefix, "tests/integration/host_sync_worker.py", str(out), *SYNC_ARGS, *extra]
    cmd.append(f"--experiment.output_dir={out}-run")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]  # a device sync in a deferred step raises
    return json.loads(Path(f"{out}.rank0.json").read_text())


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["single", "ddp", "fsdp2"])
def test_no_device_sync_between_log_steps(tmp_path, engine):
    """torch.cuda.set_sync_debug_mode("error") in every steady-state (deferred) step: any sync in
    the step or in the loop's bookkeeping after it raises. optim.fused is left to its default
    (fused SGD on CUDA; foreach under FSDP2, which then reads once per step: AdamW fused there)."""
    gpus = max(1, torch.cuda.device_count())
    prefix = [sys.executable]
    extra: list[str] = []
    if engine != "single":
        prefix = [str(BIN / "accelerate"), "launch", "--config_file", f"launch/accelerate/{engine}-gpu.yaml"]
        prefix += ["--num_processes", str(gpus)]
    if engine == "fsdp2":
        extra = ["--optim.name=adamw", "--optim.lr=0.001", "--optim.fused=true"]
    records = _worker(prefix, tmp_path / engine, *extra)
    assert len(records) == 17 and records[-1]["step"] == 16  # the skipped step resolved
    steady = [r for r in records if r["attempt"] > 0 and r["step"] % 8 not in (0, 7)]
    assert len(steady) >= 9


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["single", "ddp", "fsdp2"])
def test_compile_on_gpu(tmp_path, engine):
    """train.compile: the whole model (one GPU), the DDP-wrapped model, each block before
    sharding (FSDP2, fp32: with bf16 BatchNorm units compile is refused)."""
    gpus = max(1, torch.cuda.device_count())
    run_dir = tmp_path / engine
    prefix = [sys.executable]
    if engine != "single":
        prefix = [str(BIN / "accelerate"), "launch", "--config_file", f"launch/accelerate/{engine}-gpu.yaml"]
        prefix += ["--num_processes", str(gpus)]
    precision = "fp32" if engine == "fsdp2" else "bf16"
    cmd = [*prefix, "train.py", "--config", "configs/tiny-test.yaml", "--train.compile=true"]
    cmd += [f"--train.precision={precision}", "--sparse.check_invariants=true"]
    summary = _run([*cmd, f"--experiment.output_dir={run_dir}"], run_dir)
    assert summary["steps_completed"] == summary["plan"]["total_steps"]
    assert summary["results"]["S_2"]["density"] == pytest.approx(0.1, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["test_resnet", "resnet50"])
def test_fsdp2_bf16_batchnorm_units(tmp_path, model):
    """FSDP2 + bf16 on ResNets (cuDNN rejected bf16 BatchNorm weights beside fp32 statistics):
    every BatchNorm in its own float32 unit; masks checked every step."""
    gpus = max(1, torch.cuda.device_count())
    run_dir = tmp_path / model
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/fsdp2-gpu.yaml"]
    cmd += ["--num_processes", str(gpus), "train.py", *COMMON, f"--model.name={model}"]
    cmd += ["--sparse.check_invariants=true", "--train.max_steps=24", f"--experiment.output_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "BatchNorm units (float32)" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parallelism"] == "fsdp2" and summary["steps_completed"] == 24


@pytest.mark.gpu
def test_data_on_device_serves_the_host_paths_batches(tmp_path):
    """``data.on_device``: the images live on the GPU and every batch is gathered there; the batches
    (training: crop, flip, normalisation; evaluation; BN recalibration) equal the host path's."""
    from sparse_sup.config import load_config
    from sparse_sup.train.setup import place_data, prepare

    device = torch.device("cuda")
    keys = [[(1, i) for i in range(k, 512, 7)][:32] for k in range(3)]
    batches = {}
    for on_device in (False, True):
        overrides = [f"--experiment.output_dir={tmp_path}/{on_device}", f"--data.on_device={on_device}"]
        prepared = prepare(load_config("configs/tiny-test.yaml", overrides))
        place_data(prepared, device)
        assert prepared.train_set.images.device.type == ("cuda" if on_device else "cpu")
        train = [
            prepared.train_input.to_device(b, device, None, 0) for b in prepared.train_input.loader(keys)
        ]
        other = [s.get_batch(keys[0]) for s in (prepared.eval_set, prepared.bn_set)]
        batches[on_device] = [t.to(device) for pair in train + other for t in pair]
    assert all(torch.equal(a, b) for a, b in zip(batches[False], batches[True], strict=True))
