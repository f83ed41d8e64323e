"""Host reads ("syncs") per optimizer step of the CLI loop, counted on CPU
(``sparse_sup.train.host_syncs``): 0 in every steady-state step (no log, mask event, evaluation or
checkpoint at that step or the next one) for one process, DDP and FSDP2, with a fused optimizer
(the kind that skips a non-finite step on the device) and an injected non-finite step among the
counted ones. The deferred skip decision changes nothing: the run equals, bit for bit, the same run
with the decision read after every step, masks checked by ``sparse.check_invariants`` each step.
Run time: ~20 s per precision for one process (two runs), ~15-30 s per 2-process launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integration" / "host_sync_worker.py"
# 8 steps per epoch, mask updates and logs at multiples of 8, a non-finite step at attempt 5
ARGS = [
    "--config",
    "configs/tiny-test.yaml",
    "--train.max_steps=16",
    "--sparse.update_interval=8",
    "--train.nonfinite_steps=[5]",
    "--optim.fused=true",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def steady_syncs(records: list[dict]) -> dict[int, int]:
    """Reads of the steady-state attempts (by attempt): neither the step an attempt completes nor the
    next one is a host step (8, 16); a resolve read before a host step lands in the attempt before it.
    Attempt 0 is left out: a fused SGD's first step reads its flag on the host (momentum buffers).
    Reads in ``sparse_sup/data/`` (the input path: sampler, keys; issue 21's) are counted apart."""
    return {
        r["attempt"]: sum(n for site, n in r["sites"].items() if not site.startswith("data/"))
        for r in records
        if r["attempt"] > 0 and r["step"] % 8 not in (0, 7)
    }


def run_single(
    tmp_path: Path, name: str, precision: str, extra_env: dict | None = None
) -> tuple[Path, list[dict]]:
    out = tmp_path / name
    cmd = [sys.executable, str(WORKER), str(out), *ARGS, f"--experiment.output_dir={out}-run"]
    cmd.append(f"--train.precision={precision}")
    cmd.append("--sparse.check_invariants=true")
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**ENV, **(extra_env or {})}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(f"{out}-run"), json.loads(Path(f"{out}.rank0.json").read_text())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_single_process_no_sync_between_log_steps_and_same_run(tmp_path, precision):
    """fp16: the CPU GradScaler's fused path (found_inf handed to the fused SGD, no read)."""
    run_dir, records = run_single(tmp_path, "deferred", precision)
    steady = steady_syncs(records)
    assert len(steady) >= 9 and all(n == 0 for n in steady.values()), steady
    # the skipped attempt is there and was resolved: 17 attempts for 16 steps
    assert len(records) == 17 and records[-1]["step"] == 16
    ref_dir, ref_records = run_single(tmp_path, "reference", precision, {"SYNC_NO_DEFER": "1"})
    assert all(r["syncs"] >= 1 for r in ref_records)  # the reference reads every step
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir))
    assert summary["skipped_steps"] == ref_summary["skipped_steps"] == 1
    model, ref = (load_file(d / "final" / "model.safetensors") for d in (run_dir, ref_dir))
    assert model.keys() == ref.keys()
    for name in model:
        assert torch.equal(model[name], ref[name]), name
    losses = [
        [
            json.loads(line)["loss"]
            for line in (d / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line
        ]
        for d in (run_dir, ref_dir)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 2


@pytest.mark.parametrize("engine, optim", [("ddp", "sgd"), ("fsdp2", "adamw")])
def test_two_processes_no_sync_between_log_steps(tmp_path, engine, optim):
    """DDP: gradients are already all-reduced, the flag needs no collective. FSDP2: one all-reduce
    of the flag over the shard group per step, no read (fused SGD has no DTensor kernel: AdamW)."""
    out = tmp_path / engine
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / "accelerate" / f"{engine}-cpu.yaml"),
        str(WORKER),
        str(out),
        *ARGS,
        f"--optim.name={optim}",
        f"--experiment.output_dir={out}-run",
    ]
    if optim == "adamw":
        cmd.append("--optim.lr=0.001")
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"parallelism: {engine} over 2 process(es)" in proc.stderr
    for rank in (0, 1):
        records = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        steady = steady_syncs(records)
        assert len(steady) >= 9 and all(n == 0 for n in steady.values()), (rank, steady)
        assert len(records) == 17 and records[-1]["step"] == 16
    summary = json.loads((Path(f"{out}-run") / "summary.json").read_text())
    assert summary["skipped_steps"] == 1


@pytest.mark.slow
def test_bench_host_syncs_smoke():
    """bench/host_syncs.py --smoke (a git worktree of the 'before' commit, 16 steps; ~2 min)."""
    proc = subprocess.run(
        [sys.executable, "bench/host_syncs.py", "--smoke"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| reads per steady-state step (median; max) | 2; 2 | 0; 0 |" in proc.stdout
