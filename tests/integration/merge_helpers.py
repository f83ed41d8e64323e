"""Shared by the merge tests: run ``sparse-sup merge`` on N processes and compare two models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from sparse_sup.checkpoint import load_sharded

ROOT = Path(__file__).resolve().parents[2]


def merge(run_dir: Path, output: Path, nproc: int = 1, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    cmd = [*launch, "-m", "sparse_sup", "merge", str(run_dir), "--output", str(output), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def assert_same_model(got_dir: Path, want_dir: Path, atol: float = 0.0) -> None:
    """Masks identical; every tensor equal (``atol=0``) or within ``atol``."""
    got, want = load_sharded(got_dir), load_sharded(want_dir)
    assert got.keys() == want.keys()
    for name, (values, mask) in want.items():
        g_values, g_mask = got[name]
        assert (mask is None) == (g_mask is None), name
        if mask is not None:
            assert torch.equal(g_mask, mask), name
        if atol == 0.0:
            assert torch.equal(g_values, values), name
        else:
            torch.testing.assert_close(g_values.double(), values.double(), rtol=0, atol=atol, msg=name)
