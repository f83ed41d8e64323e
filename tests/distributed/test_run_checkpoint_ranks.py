"""Run checkpoints at scale (issue 19 item 5): in a 2-rank gloo DDP save, the replicated sparse state
(masks, superposition chain, mask history) is on disk once, split over the ranks; no file is hashed
twice and no rank hashes a file another rank wrote (rank 0 no longer reads the whole checkpoint back
while the others wait); the manifest still covers every file, a damaged file is still found, and
every rank loads its own state back exactly; resuming verifies the files over the ranks too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

from sparse_sup.checkpoint.run_state import MANIFEST, checkpoint_problems  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("run") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(HERE / "run_checkpoint_worker.py"), "save", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(Path(str(out) + ".json").read_text())
    return Path(report["checkpoint"]), report["ranks"]


def files_of(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def test_replicated_state_is_written_once_split_over_the_ranks(saved):
    path, _ = saved
    sharded = json.loads((path / "sparse_state" / MANIFEST).read_text())
    full = sum(t["numel"] * (1 if t["dtype"] == "bool" else 4) for t in sharded["tensors"].values())
    stored = [sum(e["values"][1] for e in f["entries"]) for f in sharded["files"]]
    assert sum(stored) == full  # each element once: masks, chain and history are not per rank
    assert min(stored) > 0.4 * full  # both ranks write about half
    files = files_of(path)
    rest = [files[f"sparse_sup/rank0000{r}.pt"] for r in (0, 1)]
    assert max(rest) < 0.1 * full  # each rank's own file holds only its small rest


def test_each_file_is_hashed_once_by_the_rank_that_wrote_it(saved):
    path, ranks = saved
    hashed = {r["rank"]: [name for name, _ in r["hashed"]] for r in ranks}
    every = [name for names in hashed.values() for name in names]
    assert len(every) == len(set(every))  # nothing hashed twice
    # the engine's files by their writers; the sparse state's digests come from its writers
    # (computed as the bytes were written), so no one reads those back
    assert "engine/__1_0.distcp" in hashed[1] and "engine/__0_0.distcp" in hashed[0]
    for name in every:
        assert not name.startswith(("sparse_state/", "sparse_sup/")), name
    big = files_of(path)
    assert sum(big[n] for n in hashed[0]) < 0.75 * sum(big.values())  # rank 0 hashed far from all


def test_resume_verifies_each_file_once_over_the_ranks(saved):
    """``latest_checkpoint`` skips the damaged step 9 and picks step 7, every file hashed by one
    rank; loading it right after hashes nothing again (it is unchanged since)."""
    path, ranks = saved
    assert {r["chosen"] for r in ranks} == {str(path)}
    latest = [name for r in ranks for name, _ in r["hashed_latest"]]
    assert len(latest) == len(set(latest))
    step7 = {name.split("/", 1)[1] for name in latest if name.startswith(path.name + "/")}
    assert step7 == set(files_of(path)) - {MANIFEST}
    assert all(r["hashed_latest"] for r in ranks)  # both ranks took a share
    assert [r["hashed_load"] for r in ranks] == [[], []]


def test_manifest_covers_every_file_and_a_damaged_one_is_found(saved):
    path, ranks = saved
    assert all(r["resumed_equal"] for r in ranks)  # each rank's state came back exactly
    manifest = json.loads((path / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(set(files_of(path)) - {MANIFEST})
    assert checkpoint_problems(path) == []
    for name in ("engine/__1_0.distcp", "sparse_state/shard-00001-of-00002.bin", "sparse_sup/rank00001.pt"):
        file = path / name
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
        assert checkpoint_problems(path) == [f"{file}: corrupt or truncated (SHA-256 mismatch)"]
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    assert checkpoint_problems(path) == []


def test_real_ddp_run_writes_masks_chain_and_history_once(tmp_path):
    """``train.py`` on 2 gloo processes (DDP), checkpoints up to step 40 of the tiny
    config (P at 36, the chain started)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["--config", "configs/tiny-test.yaml", "--train.max_steps=40", "--checkpoint.every_steps=40"]
    args += ["--data.max_eval_samples=128", f"--experiment.output_dir={run_dir}"]
    proc = subprocess.run(
        [*cmd, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = run_dir / "checkpoints" / "step_00000040"
    sharded = json.loads((path / "sparse_state" / MANIFEST).read_text())
    kinds = {name.split("/")[0] + "/" + name.split("/")[1] for name in sharded["tensors"]}
    assert {"engine/masks", "engine/chain", "mask_history/last", "mask_history/ever"} <= kinds
    itemsize = {"bool": 1, "float32": 4}
    full = sum(t["numel"] * itemsize[t["dtype"]] for t in sharded["tensors"].values())
    stored = [sum(e["values"][1] for e in f["entries"]) for f in sharded["files"]]
    assert sum(stored) == full and min(stored) > 0.4 * full  # once, split over the 2 ranks
    files = files_of(path)
    assert max(files[f"sparse_sup/rank0000{r}.pt"] for r in (0, 1)) < 0.1 * full
    assert checkpoint_problems(path) == []
