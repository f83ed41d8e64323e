"""Every rank passes its input checks before any rank writes, and one rank's refusal stops all of
them: found by CI as a ZeRO-3 launch that hung for 10 minutes (1 run in 7 here). Rank 1, slower to
start, checked the run directory after rank 0 had written its config there, refused it as "already
holds a run" without saying so (only rank 0 reported), and waited in its exit barrier while rank 0
waited for it in DeepSpeed's first collective."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARGS = ["--config", "configs/tiny-test.yaml", "--train.max_steps=4"]


def launch(mode: str, run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, str(HERE / "uneven_rank_train.py"), mode, *ARGS, f"--experiment.output_dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=240,  # the hang this guards against never ends: a timeout is the failure
        env=env,
        cwd=ROOT,
    )


def test_a_slow_rank_checks_before_any_rank_writes(tmp_path):
    proc = launch("slow", tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "already holds a run" not in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_one_rank_refusing_stops_every_rank_and_says_why(tmp_path):
    proc = launch("refuse", tmp_path / "run")
    assert proc.returncode != 0 and "raise ConfigError" not in proc.stderr, proc.stderr[-4000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert said == ["error: rank 1 of 2: rank-local refusal of run"], proc.stderr[-4000:]
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written


def test_the_dataset_is_prepared_once_per_node_before_the_other_ranks_read_it(tmp_path):
    """A fresh datasets cache, 2 ranks: the parquet files are converted to Arrow once, and the other
    rank reads that cache. ``datasets`` gives this itself (its builder holds a file lock on the cache
    folder while it prepares), so no barrier of ours is needed; this guards the property."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "HF_DATASETS_CACHE": str(tmp_path / "hf"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    proc = subprocess.run(
        [*cmd, *ARGS, f"--experiment.output_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("Generating train split: 0 examples") == 1, proc.stderr[-4000:]
    assert proc.stderr.count("loaded 'bundled'") == 2  # both ranks loaded it
