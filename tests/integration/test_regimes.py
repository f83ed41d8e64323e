"""The CLI loop outside the default regime: skipped steps (a real fp16 GradScaler overflow, or a
non-finite fp32 gradient), the DataLoader data path with dropout, another save cadence, early stops.
A result must not depend on anything documented as not changing it: a run stopped and resumed
with ``--resume auto``, or one that saves at another cadence, ends bit-identical to the plain run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_resume import train  # noqa: E402

from sparse_sup.checkpoint import load_sharded  # noqa: E402

# 12 of tiny-test's 48 steps (8 steps per epoch): the stop at 5 lies mid-epoch, before the first
# topology update (step 8) and the skip at step index 3 (the 4th step taken)
SKIP = "--train.nonfinite_steps=[3]"
DATALOADER_DROPOUT = ("--data.image_size=72", "--model.drop_rate=0.2")  # image_size > 64: DataLoader


def final_state(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    tensors = {k: values for k, (values, _) in load_sharded(run_dir / "final" / "sharded").items()}
    return {"tensors": tensors, "summary": summary}


def differing(got: dict, want: dict) -> list[str]:
    assert got["tensors"].keys() == want["tensors"].keys()
    return [k for k, v in want["tensors"].items() if not torch.equal(got["tensors"][k], v)]


def run_ok(run_dir: Path, *extra: str, nproc: int = 1) -> str:
    proc = train(run_dir, nproc, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((SKIP,), id="fp32-skip"),
        pytest.param(("--train.precision=fp16", SKIP), id="fp16-overflow"),
        pytest.param(DATALOADER_DROPOUT, id="dataloader-dropout"),  # no skip: the RNG draw alone
    ],
)
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, extra):
    """Stopped at step 5 (a checkpoint there), resumed to 12: bit-identical to 12 steps in one go
    (which wrote no checkpoint before the end). Covers the data position after a skipped step, the
    GradScaler state, the DataLoader's draw from the global RNG, and the save cadence."""
    skips = int(SKIP in extra)
    reference = tmp_path / "reference"
    log = run_ok(reference, "--train.max_steps=12", *extra)
    assert ("optimizer step skipped" in log) == bool(skips)  # the injected overflow really skipped
    run_dir = tmp_path / "run"
    run_ok(run_dir, "--train.max_steps=5", "--checkpoint.every_steps=5", *extra)
    run_ok(run_dir, "--train.max_steps=12", "--resume", "auto", *extra)
    got, want = final_state(run_dir), final_state(reference)
    assert want["summary"]["skipped_steps"] == skips and want["summary"]["steps_completed"] == 12
    assert differing(got, want) == []
    assert got["summary"]["results"] == want["summary"]["results"]
    assert got["summary"]["skipped_steps"] == skips


def test_fp16_on_cpu_runs_a_real_loss_scaler(tmp_path):
    """``train.precision=fp16`` on the CPU is fp16 autocast with a GradScaler (Accelerate runs
    neither there): the injected overflow halves the scale, which the checkpoint carries."""
    run_dir = tmp_path / "run"
    run_ok(run_dir, "--train.max_steps=5", "--checkpoint.every_steps=5", "--train.precision=fp16", SKIP)
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    state = torch.load(checkpoint / "sparse_sup" / "rank00000.pt", weights_only=False)
    assert state["scaler"]["scale"] == 2.0**15  # GradScaler starts at 2**16; one overflow halves it


def test_ddp_result_does_not_depend_on_save_cadence(tmp_path):
    """DDP broadcasts rank 0's BN buffers at every forward: a checkpoint that averaged the ranks'
    buffers in place changed every later step. 2 processes, a checkpoint every 5 steps or none."""
    plain, saving = tmp_path / "plain", tmp_path / "saving"
    args = ("--train.max_steps=12", "--checkpoint.at_cycle_ends=false")
    run_ok(plain, *args, "--checkpoint.every_steps=1000", nproc=2)
    run_ok(saving, *args, "--checkpoint.every_steps=5", nproc=2)
    got, want = final_state(saving), final_state(plain)
    assert differing(got, want) == []
    assert got["summary"]["results"] == want["summary"]["results"]


def test_max_steps_after_a_ticket_is_not_labelled_superposed(tmp_path):
    """Stopped by ``train.max_steps`` after T_1 (step 42 of 48): the final model is the training
    model at step 42, not S_1."""
    run_dir = tmp_path / "run"
    run_ok(run_dir, "--train.max_steps=42")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "S_1" in summary["results"]
    assert summary["final_is"] == "training model at step 42 of 48 (stopped early)"


# A LayerNorm model: with BatchNorm the per-rank batch statistics differ between world sizes in any
# run, resumed or not; here only the float reduction order of the gradient all-reduce does.
VIT_48 = ("--model.name=test_vit", "--model.kwargs={img_size: 32, patch_size: 8}", "--schedule.batch_size=48")


def max_difference(got: dict, want: dict) -> float:
    return max(float((got["tensors"][k] - v).abs().max()) for k, v in want["tensors"].items())


@pytest.mark.parametrize("engine, resume_with", [("ddp", 1), ("ddp", 3), ("fsdp2", 3)])
def test_run_checkpoint_resumes_at_another_world_size(tmp_path, engine, resume_with):
    """Killed (SIGKILL, mid-step 26 of 60, after the checkpoint at step 20) while on 2 processes,
    resumed with 1 or 3: masks, tickets and the superposed model are read in the new placement.
    Tolerance: weights within 1e-5 of the uninterrupted 2-process run (gradients are averaged in
    another order; measured below), every mask and per-layer count identical, the same P, ticket
    and S accuracies."""
    env = {"ACCELERATE_USE_FSDP": "true"} if engine == "fsdp2" else None
    args = (*VIT_48, "--checkpoint.every_steps=1000", "--checkpoint.at_cycle_ends=false")
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    proc = train(reference, 2, args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(run_dir, 2, (*args, "--checkpoint.every_steps=20"), kill=("step", 26), env=env)
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), proc.stderr[-3000:]
    proc = train(run_dir, resume_with, (*args, "--resume", "auto"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and f"over {resume_with} process(es)" in proc.stderr
    got, want = final_state(run_dir), final_state(reference)
    masks = {k: v != 0 for k, v in want["tensors"].items()}
    assert {k: v != 0 for k, v in got["tensors"].items()}.keys() == masks.keys()
    for k, keep in masks.items():
        assert torch.equal(got["tensors"][k] != 0, keep), k
    assert max_difference(got, want) < 1e-5
    accuracies = {label: r["accuracy"] for label, r in got["summary"]["results"].items()}
    assert accuracies == {label: r["accuracy"] for label, r in want["summary"]["results"].items()}


def test_data_on_device_and_pin_memory_change_nothing(tmp_path):
    """``data.on_device`` (the images kept, gathered and cropped on the model's device) and
    ``data.pin_memory`` change no result and may change at a resume: a whole run with both on equals
    one stopped at step 20 and resumed with both off, tickets, recalibration and S_M included. On
    this CPU the model's device is the host: the copy to a GPU is checked by tests/gpu."""
    reference = tmp_path / "reference"
    log = run_ok(reference, "--data.on_device=true")
    assert "S_2" in json.loads((reference / "summary.json").read_text())["results"], log[-2000:]
    run_dir = tmp_path / "run"
    run_ok(run_dir, "--train.max_steps=20", "--checkpoint.every_steps=20", "--data.on_device=true")
    run_ok(run_dir, "--resume", "auto", "--data.on_device=false", "--data.pin_memory=false")
    got, want = final_state(run_dir), final_state(reference)
    assert differing(got, want) == []
    assert got["summary"]["results"] == want["summary"]["results"]
