"""``train.compile`` and ``train.channels_last``: the CLI's tiny run compiled with CPU inductor
(needs gcc) runs to the end with check_invariants every step (slow: 2 min 15 s on 2 busy cores
with a cold inductor cache, 16 s warm), under DDP compiled after wrapping (slow: 1 min 46 s cold,
22 s warm) and under FSDP2 per block before sharding (slow: 1 min 14 s cold, 18 s warm); channels_last
runs with exact masks; both are refused, with the reason, where they cannot work (and fused SGD
under FSDP2, which torch has no DTensor kernel for)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_sup.config import ConfigError, load_config
from sparse_sup.train.wrap import check_wrap_options

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "--config", "configs/tiny-test.yaml", "--sparse.check_invariants=true"]
    cmd += [*args, f"--experiment.output_dir={tmp_path / 'run'}"]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="CPU inductor compiles C++: needs gcc")
def test_compile_one_process_runs_to_the_end(tmp_path):
    proc = train(tmp_path, "--train.compile=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch.compile: the whole model" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_completed"] == summary["plan"]["total_steps"] == 48


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="CPU inductor compiles C++: needs gcc")
def test_compile_ddp_after_wrapping(tmp_path):
    """2 processes (gloo): the DDP-wrapped model compiled, 8 steps with 2 topology updates and
    check_invariants (1 min 46 s on 2 busy cores)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "launch/accelerate/ddp-cpu.yaml",
    ]
    cmd += ["train.py", "--config", "configs/tiny-test.yaml", "--sparse.check_invariants=true"]
    cmd += ["--train.compile=true", "--train.max_steps=8", f"--experiment.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch.compile: the DDP-wrapped model" in proc.stderr
    assert "parallelism: ddp over 2 process(es)" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="CPU inductor compiles C++: needs gcc")
def test_compile_fsdp2_per_block(tmp_path):
    """2 processes (gloo): each block compiled before it is sharded (static shapes), 8 steps with 2
    topology updates and check_invariants (1 min 14 s on 2 busy cores)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "launch/accelerate/fsdp2-cpu.yaml",
    ]
    cmd += ["train.py", "--config", "configs/tiny-test.yaml", "--sparse.check_invariants=true"]
    cmd += ["--train.compile=true", "--train.max_steps=8", f"--experiment.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FSDP2: 5 units (float32)" in proc.stderr
    assert "Cannot convert expression" not in proc.stderr  # no failed (dynamic-shape) compile
    assert "step 8/8" in proc.stderr


def test_channels_last_one_process_exact_masks(tmp_path):
    proc = train(tmp_path, "--train.channels_last=true", "--train.max_steps=8")  # 2 topology updates
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "channels_last: weights and input batches" in proc.stderr
    assert "step 4 update" in proc.stderr and "step 8 update" in proc.stderr


@pytest.mark.parametrize(
    "overrides, parallelism, match",
    [
        (["train.compile=true"], "deepspeed", r"train\.compile=true under DeepSpeed"),
        (["train.channels_last=true"], "fsdp2", r"train\.channels_last=true under fsdp2"),
        (["train.channels_last=true"], "deepspeed", r"train\.channels_last=true under deepspeed"),
        (["optim.fused=true"], "fsdp2", r"optim\.fused=true with sgd under FSDP2"),
    ],
)
def test_refused_where_it_cannot_work(overrides, parallelism, match):
    config = load_config(ROOT / "configs" / "tiny-test.yaml", [f"--{o}" for o in overrides])
    with pytest.raises(ConfigError, match=match):
        check_wrap_options(config, parallelism)
    for allowed in ("single", "ddp"):
        check_wrap_options(config, allowed)


@pytest.mark.parametrize(
    "parallelism, world, match",
    [
        ("single", 1, r"train\.dp_replicate=2 \(HSDP\) under single"),
        ("ddp", 2, r"train\.dp_replicate=2 \(HSDP\) under ddp"),
        ("deepspeed", 2, r"train\.dp_replicate=2 \(HSDP\) under deepspeed"),
        ("fsdp2", 3, r"train\.dp_replicate=2 does not divide the 3 processes"),
    ],
)
def test_hsdp_refused_where_its_mesh_cannot_exist(parallelism, world, match):
    config = load_config(ROOT / "configs" / "tiny-test.yaml", ["--train.dp_replicate=2"])
    with pytest.raises(ConfigError, match=match):
        check_wrap_options(config, parallelism, world)
    check_wrap_options(config, "fsdp2", 4)
