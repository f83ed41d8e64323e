"""Run checkpoints: everything a run needs to continue exactly where it stopped.

Layout of ``RUN_DIR/checkpoints/step_00001234/``::

    engine/              model + optimizer in the engine's own sharded format (DCP, or DeepSpeed's)
    sparse_sup/rankNNNNN.pt   this rank's sparse state: engine (masks, chain, counters), loop, RNG
    manifest.json        step, world size and the SHA-256 of every file above

A checkpoint is written under a temporary name (``.tmp_step_N-<pid>@<host>``, removed by a later
save once its writer is gone) and published by an atomic rename after every rank finished; a
directory without a valid manifest, or with a file that does not match it, is never loaded
(``latest_checkpoint`` falls back to the previous one and says so, and refuses when none is intact).
Rotation never deletes the checkpoint just written (see ``_rotate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .files import _atomic_write_bytes, _fsync_dir, atomic_torch_save, load_verified, owner_tag, remove_stale
from .sharded import CheckpointError, save_sharded
from .state_pieces import rank_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
SHARDED_STATE = "sparse_state"  # the world-size-independent part of the sparse state
PREFIX = "step_"
TMP_PREFIX = f".tmp_{PREFIX}"  # + step + the writer's owner tag


def _dist() -> tuple[int, int, bool]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size(), True) if on else (0, 1, False)


def _barrier() -> None:
    import torch.distributed as dist

    if _dist()[2]:
        dist.barrier()


def _broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (so all ranks load the same checkpoint)."""
    import torch.distributed as dist

    if not _dist()[2]:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    return int(name[len(PREFIX) :]) if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() else None


def save_run_checkpoint(
    run_dir: Path, step: int, backend, sparse_state: dict, keep: int, pieces: dict | None = None
) -> Path:
    """Collective. ``sparse_state``: this rank's picklable state (tensors, dicts, numbers);
    ``pieces``: state tensors with their global layout (``state_pieces.split_state``), written as a
    sharded checkpoint that any world size reads back (masks, superposition chain, mask history)."""
    rank, world, _ = _dist()
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"{PREFIX}{step:08d}"
    tmp = None
    if rank == 0:
        remove_stale(root, lambda name: name.startswith(TMP_PREFIX))  # left by runs killed while writing
        tmp = root / f"{TMP_PREFIX}{step:08d}{owner_tag()}"
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from a save that raised
        tmp.mkdir(parents=True)
    tmp = Path(_broadcast(None if tmp is None else str(tmp)))
    backend.save_training_state(tmp / "engine")
    if pieces is not None:
        save_sharded(tmp / SHARDED_STATE, pieces, {"step": step})
    atomic_torch_save(sparse_state, tmp / "sparse_sup" / rank_file(rank))
    _barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for folder in {p.parent for p in files}:  # the engine's writers fsync files, not folders
            _fsync_dir(folder)
        manifest = {
            "format": 1,
            "step": step,
            "world_size": world,
            "parallelism": backend.kind,
            "sharded_state": pieces is not None,
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in files},
        }
        _atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        if final.exists():  # a replay after a crash reached the same step again
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _rotate(run_dir, step, keep)
    _barrier()
    return final


def _rotate(run_dir: Path, step: int, keep: int) -> None:
    """Rank 0, after publishing ``step``: keep the newest ``keep`` checkpoints up to ``step`` (so
    the one just written, the newest valid one, is always kept) and delete every checkpoint after
    ``step``. Those exist only when this run resumed from an earlier checkpoint (the later ones
    were damaged, or an older one was chosen): they belong to the abandoned continuation, disagree
    with the truncated metrics.jsonl, and counting them could delete the good one just written."""
    for path in list_checkpoints(run_dir):
        if checkpoint_step(path) > step:
            log.warning("deleting checkpoint %s: after step %d, which this run continued from", path, step)
            shutil.rmtree(path, ignore_errors=True)
    for old in list_checkpoints(run_dir)[max(keep, 1) :]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoint directories of a run, newest first (not verified)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with a checkpoint directory (empty: complete and intact)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path / MANIFEST}: missing or unreadable ({e.__class__.__name__})"]
    problems = []
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif _sha256(file) != digest:
            problems.append(f"{file}: corrupt or truncated (SHA-256 mismatch)")
    return problems


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete, intact checkpoint (chosen by rank 0 for every rank); None when there
    is no checkpoint at all. Raises ``CheckpointError`` (on every rank) when checkpoints exist but
    none is intact: starting from step 0 would silently discard the run and its metrics."""
    chosen, damaged = None, []
    if _dist()[0] == 0:
        for path in list_checkpoints(run_dir):
            problems = checkpoint_problems(path)
            if not problems:
                chosen = str(path)
                break
            damaged.append(path.name)
            log.warning("skipping checkpoint %s: %s; falling back to the previous one", path, problems[0])
    chosen, damaged = _broadcast((chosen, damaged))
    if chosen is None and damaged:
        root = Path(run_dir) / CHECKPOINTS
        raise CheckpointError(
            f"{root} holds {len(damaged)} checkpoint(s) ({', '.join(damaged)}) and none is complete and "
            "intact, so the run cannot continue; restore them, or delete those folders to start this "
            "run again from step 0, or start a new run in another experiment.output_dir"
        )
    return None if chosen is None else Path(chosen)


def read_checkpoint_manifest(path: Path) -> dict:
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {problems[0]}")
    return json.loads((Path(path) / MANIFEST).read_text())


def world_size_problem(manifest: dict, world: int) -> str | None:
    """Why a checkpoint cannot resume at ``world`` processes (None: it can). DCP reshards the model
    and optimizer of one process, DDP and FSDP2, and the sparse state is sharded with its global
    layout; DeepSpeed's engine checkpoint and checkpoints of older versions keep each rank's piece."""
    written = manifest["world_size"]
    if written == world:
        return None
    why = None
    if manifest.get("parallelism") == "deepspeed":
        why = "DeepSpeed's engine checkpoint holds each rank's ZeRO partition"
    elif not manifest.get("sharded_state"):
        why = "it was written before run checkpoints could be resharded"
    if why is None:
        return None
    return (
        f"was written by {written} processes and this job has {world}: {why}; relaunch with {written} "
        "processes (tickets, unlike these run checkpoints, can be read at any world size: see "
        "'sparse-sup merge')"
    )


def load_run_checkpoint(path: Path, backend) -> tuple[dict, Path | None]:
    """Collective. Loads model and optimizer into ``backend`` in place; returns this rank's sparse
    state (at another world size rank 0's: counters, results, RNG and buffers as rank 0 had them)
    and the sharded part's directory (None for checkpoints without one). Raises ``CheckpointError``
    for a corrupt checkpoint or a world size it cannot resume at."""
    rank, world, _ = _dist()
    manifest = _broadcast(read_checkpoint_manifest(path) if rank == 0 else None)
    problem = world_size_problem(manifest, world)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
    backend.load_training_state(Path(path) / "engine")
    source = rank if manifest["world_size"] == world else 0
    state = load_verified(Path(path) / "sparse_sup" / rank_file(source))
    return state, Path(path) / SHARDED_STATE if manifest.get("sharded_state") else None
