"""``accelerate launch`` with 2 CPU processes runs the tiny config end to end under DDP, FSDP2 and
DeepSpeed ZeRO-2/3 (Accelerate's plugin), and with 4 under HSDP (``train.dp_replicate=2``), with 2
accumulation steps and prints the same summary as
one process. (Step-for-step equality with a one-process reference, accumulation included, is
checked on a float64/float32 toy model in tests/distributed: on a real fp32 model, summation order
alone moves near-tied RigL choices.) The sharded tickets of the FSDP2 and ZeRO-3 runs are merged
again by 1 and by 3 processes into the run's own S_M."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[2]


COMMON = ["--config", "configs/tiny-test.yaml", "--schedule.epochs=3", "--sparse.check_ranks=true"]


@pytest.mark.parametrize(
    "engine, parallelism, nproc, extra",
    [
        ("ddp", "ddp", 2, []),
        ("fsdp2", "fsdp2", 2, []),
        ("deepspeed_zero2", "deepspeed", 2, []),
        ("deepspeed_zero3", "deepspeed", 2, []),
        # HSDP: shards within each pair of ranks, the two pairs replicas of each other
        ("fsdp2", "fsdp2", 4, ["--train.dp_replicate=2"]),
    ],
    ids=["ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3", "hsdp_2x2"],
)
def test_accelerate_launch_cpu_processes(tmp_path, engine, parallelism, nproc, extra):
    run_dir = tmp_path / engine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / "accelerate" / f"{engine}-cpu.yaml"),
        f"--num_processes={nproc}",
        "train.py",
        *COMMON,
        *extra,
        "--schedule.grad_accum_steps=2",
        f"--experiment.output_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"parallelism: {parallelism} over {nproc} process(es)" in proc.stderr
    if extra:
        assert "HSDP mesh DeviceMesh((replicate=2, shard=2)" in proc.stderr
    for label in ("| P |", "| T_1 |", "| S_2 |", "| final = S_2 |"):
        assert proc.stdout.count(label) == 1, proc.stdout  # printed once, by rank 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == nproc and summary["parallelism"] == parallelism
    results = summary["results"]
    assert all(r["count"] == 300 for r in results.values())
    assert results["S_2"]["density"] == pytest.approx(0.1, abs=1e-4)
    assert results["final"]["accuracy"] == results["S_2"]["accuracy"]
    assert summary["steps_completed"] == summary["plan"]["total_steps"] == 24
    if engine in ("fsdp2", "deepspeed_zero3"):
        # tickets written by the sharded processes, merged again by 1 and by 3: the run's own S_2
        from merge_helpers import assert_same_model, merge

        for nproc in (1, 3):
            out = tmp_path / f"merged{nproc}"
            proc = merge(run_dir, out, nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert_same_model(out / "sharded", run_dir / "final" / "sharded", atol=1e-5)
