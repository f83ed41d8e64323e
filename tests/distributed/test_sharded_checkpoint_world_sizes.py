"""Sharded checkpoints written by real gloo process groups and read back at other world sizes:
values and masks equal the single-process truth exactly."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import sharded_checkpoint_worker as worker  # noqa: E402

from sparse_sup.checkpoint.sharded import CheckpointError, load_sharded, read_manifest, verify_sharded  # noqa: E402


def torchrun(nproc: int, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(
        [*cmd, str(HERE / "sharded_checkpoint_worker.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(Path(args[-1] + ".json").read_text())


def read_as(world: int, ckpt: Path, split) -> None:
    """Read ``ckpt`` as each rank of ``world`` would (load_sharded is not collective)."""
    data = worker.truth()
    for rank in range(world):
        wanted = {
            name: split(shape, world, rank)
            if split is worker.row_run
            else split(math.prod(shape), world, rank)
            for name, (shape, *_) in worker.SPEC.items()
        }
        assert worker.check(load_sharded(ckpt, wanted), data, wanted) == len(worker.SPEC)


@pytest.fixture(scope="module")
def written_by_2(tmp_path_factory) -> tuple[Path, dict]:
    a = tmp_path_factory.mktemp("sharded") / "by2"
    return a, torchrun(2, "write", str(a))


def test_write_at_2_read_whole_at_1(written_by_2):
    a, report = written_by_2
    assert "already exists" in report["exists"] and str(a) in report["exists"]
    assert "'fc.bias'" in report["disagree"] and "same global tensor" in report["disagree"]
    assert not report["bad_published"] and report["leftovers"] == []

    manifest = read_manifest(a)
    assert manifest["world_size"] == 2 and manifest["meta"] == worker.META
    assert verify_sharded(a) == []
    held = [{e["tensor"]: e for e in f["entries"]} for f in manifest["files"]]
    # replicated tensors: each rank wrote its own slice, nothing twice
    assert held[0]["bn.running_mean"]["numel"] == held[1]["bn.running_mean"]["numel"] == 3
    assert "bn.num_batches_tracked" in held[0] and "bn.num_batches_tracked" not in held[1]
    assert "single_row" not in held[1] and "no_rows" not in held[0]  # empty pieces store nothing

    whole = load_sharded(a)  # world 1
    wanted = {name: (0, math.prod(shape)) for name, (shape, *_) in worker.SPEC.items()}
    assert worker.check(whole, worker.truth(), wanted) == len(worker.SPEC)
    read_as(3, a, worker.row_run)


def test_read_at_3_write_at_3_read_at_2(written_by_2, tmp_path):
    a, b = written_by_2[0], tmp_path / "by3"
    report = torchrun(3, "read", str(a), str(b))  # real 3-rank read of a, then a 3-rank write of b
    assert report["checked"] == 3 * 2 * len(worker.SPEC) and report["leftovers"] == []
    assert read_manifest(b)["world_size"] == 3 and verify_sharded(b) == []
    for world in (1, 2):
        read_as(world, b, worker.row_run)
        read_as(world, b, worker.flat_run)

    # only files overlapping the wanted ranges are opened: spoil rank 1's file of a copy of b
    c = tmp_path / "spoiled"
    shutil.copytree(b, c)
    spoiled = c / "shard-00001-of-00003.bin"
    raw = bytearray(spoiled.read_bytes())
    raw[0] ^= 0xFF
    spoiled.write_bytes(bytes(raw))
    first = {"conv.weight": worker.row_run((5, 3, 3, 3), 3, 0)}  # rows 0-1: in rank 0's file only
    assert torch.equal(load_sharded(c, first)["conv.weight"][0], worker.truth()["conv.weight"][0][:54])
    with pytest.raises(CheckpointError, match="shard-00001-of-00003.bin: SHA-256 mismatch"):
        load_sharded(c, {"conv.weight": (50, 10)})  # crosses into rank 1's rows
    assert verify_sharded(c) == [f"{spoiled}: SHA-256 mismatch (corrupt)"]
