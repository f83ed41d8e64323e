"""Without ``experiment.output_dir`` every rank must write the one run directory rank 0 named,
even when the ranks' clocks read different seconds (2 real processes over gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def test_ranks_share_the_timestamped_run_directory(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "clock_worker.py"),
        "--config",
        str(ROOT / "configs/tiny-test.yaml"),
        "--train.max_steps=1",
        "--checkpoint.every_steps=1",  # every rank writes into the run directory
        "--data.max_eval_samples=64",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    told = sorted(line for line in proc.stdout.splitlines() if " run_dir " in line)
    assert len(told) == 2 and told[0].split()[-1] == told[1].split()[-1], (told, proc.stderr[-3000:])
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(made) == 1, f"one run, {len(made)} directories: {made}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / made[0]
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "step_00000001").is_dir()
