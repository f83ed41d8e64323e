"""The regime matrix: the real CLI loop over the axes users combine — engine and world size,
precision, gradient accumulation, a skipped step (an injected overflow), dropout on the DataLoader
path, save cadence and a stop + ``--resume auto``.

Every run sets ``sparse.check_invariants``, so after *every* optimizer step the run itself asserts
exact per-layer counts, zero masked weights, gradients and optimizer state, and identical masks on
every replica (``sparse_sup/core/invariants.py``); a violation fails the run. Each case then checks
that a run stopped mid-phase-1 (with a checkpoint at another cadence) and resumed ends bit-identical
to the uninterrupted one: P, both tickets, both superpositions and the final model.

A representative slice runs by default; the whole matrix with ``pytest -m slow`` (README: run time).
Combinations the CPU cannot run are listed in ``CPU_LIMITS`` (and the README's engine table) with why.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_resume import assert_identical, snapshot, train  # noqa: E402

CHECKED = ("--sparse.check_invariants=true", "--train.nonfinite_steps=[3]")
VIT = ("--model.name=test_vit", "--model.kwargs={img_size: 32, patch_size: 8}")  # LayerNorm: bf16 on CPU
FSDP2 = {"ACCELERATE_USE_FSDP": "true"}
ZERO = {stage: ("--deepspeed", f"launch/deepspeed/zero{stage}.json") for stage in (1, 2, 3)}

# (id, processes, extra args, environment, engine the log must name, default slice?)
CASES = [
    (
        "single-fp16-accum2",
        1,
        ("--train.precision=fp16", "--schedule.grad_accum_steps=2"),
        None,
        "single",
        False,
    ),
    ("single-bf16-vit", 1, ("--train.precision=bf16", *VIT), None, "single", False),
    (
        "single-dataloader-dropout",
        1,
        ("--data.image_size=72", "--model.drop_rate=0.2"),
        None,
        "single",
        False,
    ),
    ("ddp2-fp16-accum2", 2, ("--train.precision=fp16", "--schedule.grad_accum_steps=2"), None, "ddp", True),
    (
        "ddp2-bf16-vit-adamw",
        2,
        ("--train.precision=bf16", "--optim.name=adamw", "--optim.lr=0.001", *VIT),
        None,
        "ddp",
        False,
    ),
    ("fsdp2-2-fp32-accum2", 2, ("--schedule.grad_accum_steps=2",), FSDP2, "fsdp2", False),
    ("fsdp2-2-fp16", 2, ("--train.precision=fp16",), FSDP2, "fsdp2", False),
    ("fsdp2-2-bf16-vit", 2, ("--train.precision=bf16", *VIT), FSDP2, "fsdp2", False),
    ("zero1-2-fp32", 2, ZERO[1], None, "deepspeed", False),
    ("zero2-2-bf16-vit", 2, (*ZERO[2], "--train.precision=bf16", *VIT), None, "deepspeed", False),
    (
        "zero3-3-fp32-accum2",
        3,
        (*ZERO[3], "--schedule.grad_accum_steps=2", "--schedule.batch_size=48"),
        None,
        "deepspeed",
        False,
    ),
    ("zero3-2-bf16-vit", 2, (*ZERO[3], "--train.precision=bf16", *VIT), None, "deepspeed", False),
    # 8 ranks: the 10-element head bias leaves ranks 5-7 holding only padding (offsets past numel)
    ("zero3-8-fp32", 8, ZERO[3], None, "deepspeed", False),
]


def _param(case):
    name, nproc, extra, env, kind, default = case
    marks = () if default else (pytest.mark.slow,)
    return pytest.param(name, nproc, extra, env, kind, id=name, marks=marks)


@pytest.mark.parametrize("name, nproc, extra, env, kind", [_param(c) for c in CASES])
def test_regime(tmp_path, name, nproc, extra, env, kind):
    args = (*CHECKED, "--data.max_eval_samples=128", *extra)
    reference = tmp_path / "reference"
    proc = train(reference, nproc, (*args, "--checkpoint.every_steps=1000"), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"parallelism: {kind} over {nproc} process(es)" in proc.stderr
    assert "optimizer step skipped" in proc.stderr  # the injected overflow was a real skipped step
    # SIGKILL (rank 0; torchrun then ends the others) at a seeded random moment: inside optimizer step
    # number `kill_at` of phase 1, after the real update and before the engine counted it
    kill_at = random.Random(name).randint(9, 34)
    run_dir, args = tmp_path / "run", (*args, "--checkpoint.every_steps=7")
    killed = train(run_dir, nproc, args, kill=("step", kill_at), env=env)
    assert killed.returncode != 0 and not (run_dir / "summary.json").exists(), killed.stderr[-4000:]
    resumed = train(run_dir, nproc, (*args, "--resume", "auto"), env=env)
    assert resumed.returncode == 0, f"killed at step {kill_at}: " + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    assert_identical(snapshot(run_dir), snapshot(reference))
