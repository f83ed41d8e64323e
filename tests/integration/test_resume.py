"""A run killed (SIGKILL) at any moment and resumed with ``--resume auto`` ends with the same masks,
tickets, superposed models and weights as an uninterrupted run: bit-equal in fp32 on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_sup.checkpoint import load_sharded

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SNAPSHOTS = ("tickets/P", "tickets/T_1", "tickets/S_1", "tickets/T_2", "tickets/S_2", "final/sharded")
# 48 steps: phase 1 = 36 (updates every 4), 2 cycles x 6; a checkpoint every 10 steps and at each cycle end
ARGS = ["--config", "configs/tiny-test.yaml", "--checkpoint.every_steps=10", "--data.max_eval_samples=128"]


def _env(extra: dict | None = None) -> dict:
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return {**base, **(extra or {})}


def _launch(nproc: int, script: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, *script]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *script,
    ]


def train(
    run_dir: Path, nproc: int = 1, extra: tuple = (), kill: tuple | None = None, env: dict | None = None
):
    """``train.py`` (or the crash worker) on ``nproc`` processes: one, or several over gloo via
    torchrun (DDP; FSDP2 with ``ACCELERATE_USE_FSDP`` in ``env``; DeepSpeed with ``--deepspeed``)."""
    args = [*ARGS, f"--experiment.output_dir={run_dir}", *extra]
    script = [str(HERE / "crash_worker.py"), *map(str, kill), "--"] if kill else [str(ROOT / "train.py")]
    cmd = _launch(nproc, [*script, *args])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(env), cwd=ROOT)


def snapshot(run_dir: Path) -> dict:
    out = {}
    for name in SNAPSHOTS:
        for tensor, (values, mask) in load_sharded(run_dir / name).items():
            out[f"{name}:{tensor}"] = (values, mask)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"tensors": out, "results": summary["results"], "steps": summary["steps_completed"]}


def assert_identical(got: dict, want: dict) -> None:
    assert got["steps"] == want["steps"]
    assert got["tensors"].keys() == want["tensors"].keys()
    for key, (values, mask) in want["tensors"].items():
        g_values, g_mask = got["tensors"][key]
        assert torch.equal(g_values, values), key
        assert (g_mask is None and mask is None) or torch.equal(g_mask, mask), key
    assert got["results"] == want["results"]


def kill_and_resume(
    run_dir: Path, kills: list[tuple[str, int]], nproc: int = 1, extra: tuple = (), env: dict | None = None
) -> None:
    """Start, then after each SIGKILL relaunch with ``--resume auto`` (killed again at the next
    point, counted within that process), and finally let it finish."""
    for i, kill in enumerate([*kills, None]):
        resume = ("--resume", "auto") if i else ()
        proc = train(run_dir, nproc, (*extra, *resume), kill, env)
        if kill is None:
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), proc.stderr[-3000:]
        if i:
            assert "resumed from" in proc.stderr, proc.stderr[-3000:]


def check_metrics_continue(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps == sorted(set(train_steps)), "metrics.jsonl must continue, not repeat steps"
    assert train_steps[-1] == 48


def test_killed_run_resumes_bit_identical(tmp_path):
    """One process, killed four times: mid-step (step 13), mid-topology-update (step 20), while
    writing the step-30 checkpoint, and during the first superposition (step 42); before the last
    relaunch the newest checkpoint is corrupted, so resume must fall back to the one before."""
    reference = tmp_path / "reference"
    proc = train(reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    kill_and_resume(run_dir, [("step", 13), ("update", 3), ("checkpoint", 2), ("superposition", 1)])
    assert_identical(snapshot(run_dir), snapshot(reference))
    check_metrics_continue(run_dir)


def corrupt(checkpoint: Path) -> None:
    rank_file = checkpoint / "sparse_sup" / "rank00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    """The damaged step-40 checkpoint is skipped (resume from 36); the resumed run's first checkpoint
    (38, keep_last=1) is kept and the abandoned step 40 deleted, not the reverse; once every
    checkpoint is damaged, ``--resume auto`` refuses instead of restarting from step 0."""
    run_dir = tmp_path / "run"
    proc = train(run_dir, kill=("superposition", 1))  # killed at step 42: checkpoints 36 and 40 kept
    assert proc.returncode != 0
    previous, newest = sorted((run_dir / "checkpoints").iterdir())
    corrupt(newest)
    keep_one = ("--checkpoint.every_steps=19", "--checkpoint.keep_last=1")  # a checkpoint at 38
    proc = train(run_dir, extra=("--resume", "auto", "--train.max_steps=38", *keep_one))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping checkpoint {newest}" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from {previous} at step 36" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000038"]

    corrupt(run_dir / "checkpoints" / "step_00000038")
    before = (run_dir / "metrics.jsonl").read_text()
    proc = train(run_dir, extra=("--resume", "auto"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{run_dir / 'checkpoints'} holds 1 checkpoint(s) (step_00000038)" in proc.stderr
    assert "delete those folders to start this run again from step 0" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # not restarted over the run


FSDP2 = {"ACCELERATE_USE_FSDP": "true"}  # what `accelerate launch` with an FSDP config exports


@pytest.mark.parametrize(
    "nproc, extra, env, kind, kills",
    [
        (2, (), None, "ddp", [("update", 5), ("superposition", 2)]),  # DDP over gloo
        (2, (), FSDP2, "fsdp2", [("checkpoint", 2), ("step", 9)]),  # FSDP2: DTensor shards through DCP
        pytest.param(  # ZeRO-3 through torchrun; bit-identical too (measured), ~3x slower than DDP
            2,
            ("--deepspeed", "launch/deepspeed/zero3.json"),
            None,
            "deepspeed",
            [("update", 5), ("checkpoint", 1)],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["ddp", "fsdp2", "zero3"],
)
def test_killed_distributed_run_resumes_identical(tmp_path, nproc, extra, env, kind, kills):
    reference = tmp_path / "reference"
    proc = train(reference, nproc, extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"parallelism: {kind} over {nproc} process(es)" in proc.stderr  # the engine under test
    run_dir = tmp_path / "run"
    kill_and_resume(run_dir, kills, nproc, extra, env)
    assert_identical(snapshot(run_dir), snapshot(reference))
    check_metrics_continue(run_dir)


def test_deepspeed_resume_at_another_world_size_is_refused(tmp_path):
    """One process, DDP and FSDP2 checkpoints resume at another world size
    (test_regimes.py); DeepSpeed's engine checkpoint holds each rank's ZeRO partition: refused
    before anything is touched."""
    run_dir = tmp_path / "run"
    zero2 = ("--deepspeed", "launch/deepspeed/zero2.json")
    proc = train(run_dir, extra=(*zero2, "--train.max_steps=12"))  # a checkpoint at step 10, 1 process
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (run_dir / "metrics.jsonl").read_text()
    proc = train(run_dir, nproc=2, extra=(*zero2, "--resume", "auto"))
    assert proc.returncode != 0  # each worker exits 2; torchrun reports the job as failed
    assert proc.stderr.count("error: --resume: checkpoint") == 1, proc.stderr[-3000:]  # rank 0 says it
    assert "written by 1 processes and this job has 2: DeepSpeed's engine checkpoint" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing touched


def write_tar_shards(root: Path, train_files: int = 4, train: int = 512, test: int = 128) -> Path:
    """The bundled images as WebDataset shards (``<key>.jpg`` + ``<key>.cls``): ``train_files``
    training tars and one test tar."""
    import io
    import tarfile

    from sparse_sup.data import load_split_datasets

    splits = load_split_datasets("bundled")
    root.mkdir(parents=True)

    def shard(path: Path, ds, ids) -> None:
        with tarfile.open(path, "w") as tar:
            for i in ids:
                row = ds[i]
                buf = io.BytesIO()
                row["image"].save(buf, format="JPEG", quality=95)
                for suffix, data in (("jpg", buf.getvalue()), ("cls", str(row["label"]).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    per = train // train_files
    for f in range(train_files):
        shard(root / f"train-{f:05d}.tar", splits.train, range(f * per, (f + 1) * per))
    shard(root / "test-00000.tar", splits.eval, range(test))
    return root


def test_streamed_run_killed_mid_epoch_resumes_identical(tmp_path):
    """data.streaming over 4 WebDataset shards, 2 DDP processes (2 shards each), 2 workers each
    (1 shard each): killed at step 13, mid-epoch (8 steps per epoch; the newest checkpoint is step
    10), and resumed, the run ends equal to the uninterrupted streamed run."""
    shards = write_tar_shards(tmp_path / "shards")
    extra = (
        f"--data.source={shards}",
        "--data.streaming=true",
        "--data.num_workers=2",
        "--tickets.bn_recal_batches=1",
        "--sparse.check_ranks=true",
    )
    reference = tmp_path / "reference"
    proc = train(reference, 2, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parallelism: ddp over 2 process(es)" in proc.stderr and "a stream of" in proc.stderr
    run_dir = tmp_path / "run"
    kill_and_resume(run_dir, [("step", 13)], 2, extra)
    assert_identical(snapshot(run_dir), snapshot(reference))
    check_metrics_continue(run_dir)
