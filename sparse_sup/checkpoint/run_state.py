"""Run checkpoints: everything a run needs to continue exactly where it stopped.

Layout of ``RUN_DIR/checkpoints/step_00001234/``::

    engine/              model + optimizer in the engine's own sharded format (DCP, or DeepSpeed's)
    sparse_sup/rankNNNNN.pt   this rank's sparse state: engine (masks, chain, counters), loop, RNG
    manifest.json        step, world size and the SHA-256 of every file above

Each file is written once: the model and optimizer by the engine (DCP de-duplicates DDP's replicas),
the sharded part split over the ranks (replicated tensors too: each rank writes its own run), and
each rank's small rest. The manifest's SHA-256s are spread over the ranks: the digests of the
sparse state are computed from the bytes as they are written, and the engine's files are hashed
by the rank that wrote them (``__R_*.distcp``, ``zero_pp_rank_R_*``; the others balanced by size),
so rank 0 no longer reads the whole checkpoint back while the other ranks wait. A resume verifies
every file once, shared over the ranks the same way (``verify_checkpoint``).

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
import re
import shutil
from pathlib import Path

from .files import (
    _atomic_write_bytes,
    _fsync_dir,
    atomic_torch_save,
    load_verified,
    owner_tag,
    remove_stale,
    sidecar_text,
)
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
    sharded checkpoint that any world size reads back (masks, superposition chain, mask history).
    Any rank's failure after the writes (hashing, manifest, publishing) is raised on every rank."""
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
    written: dict[str, str] = {}  # relative path -> SHA-256 of the bytes this rank wrote there
    backend.save_training_state(tmp / "engine")
    if pieces is not None:
        digests = save_sharded(tmp / SHARDED_STATE, pieces, {"step": step})
        written.update({f"{SHARDED_STATE}/{name}": digest for name, digest in digests.items()})
    name = f"sparse_sup/{rank_file(rank)}"
    digest = atomic_torch_save(sparse_state, tmp / name)
    written[name] = digest
    written[name + ".sha256"] = hashlib.sha256(sidecar_text(digest)).hexdigest()
    digests = _spread_digests(tmp, written, rank, world)  # also the barrier: every rank wrote
    outcome = "ok"
    if rank == 0:
        try:
            if isinstance(digests, str):
                raise CheckpointError(digests)
            # the engine's writers fsync files, not folders
            for folder in {(tmp / p).parent for p in digests}:
                _fsync_dir(folder)
            manifest = {
                "format": 1,
                "step": step,
                "world_size": world,
                "parallelism": backend.kind,
                "sharded_state": pieces is not None,
                "files": digests,
            }
            _atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            if final.exists():  # a replay after a crash reached the same step again
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            _rotate(run_dir, step, keep)
        except Exception as e:  # raised on every rank below; nothing is published
            outcome = str(e) if isinstance(e, CheckpointError) else f"writing {final} failed: {e!r}"
    outcome = _broadcast(outcome)
    if outcome != "ok":
        raise CheckpointError(outcome)
    return final


_WRITER = (re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$"), re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_"))


def _writer_rank(name: str, world: int) -> int | None:
    """The rank that wrote the engine file ``name`` when its name says so (DCP, DeepSpeed ZeRO)."""
    for pattern in _WRITER:
        found = pattern.search(name)
        if found and int(found.group(1)) < world:
            return int(found.group(1))
    return None


def hash_shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Which rank hashes which file: the rank that wrote it where the name says (it may still be in
    that rank's page cache), the rest largest first to the rank with the fewest bytes so far."""
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    rest = []
    for name in sorted(sizes):
        owner = _writer_rank(name, world)
        if owner is None:
            rest.append(name)
        else:
            shares[owner].append(name)
            load[owner] += sizes[name]
    for name in sorted(rest, key=lambda n: (-sizes[n], n)):
        target = min(range(world), key=lambda r: (load[r], r))
        shares[target].append(name)
        load[target] += sizes[name]
    return shares


def _spread_digests(tmp: Path, written: dict[str, str], rank: int, world: int) -> dict[str, str] | str:
    """Collective (gather, broadcast, gather: no tensors). Rank 0 gets the SHA-256 of every file
    under ``tmp`` (an error message if a rank failed), each file hashed once: those a rank wrote
    itself come with it (``written``, hashed as written), the others are shared out by
    ``hash_shares``. The other ranks get None."""
    known = _gather(written)  # returns on rank 0 once every rank has written its files
    plan = None
    if rank == 0:
        digests = {name: digest for part in known for name, digest in part.items()}
        sizes = {
            str(p.relative_to(tmp)): p.stat().st_size
            for p in tmp.rglob("*")
            if p.is_file() and str(p.relative_to(tmp)) not in digests
        }
        plan = hash_shares(sizes, world)
    mine = {}
    try:
        for name in _broadcast(plan)[rank]:
            mine[name] = _sha256(tmp / name)
    except OSError as e:
        mine = {"": f"rank {rank} could not hash {tmp}: {e}"}
    hashed = _gather(mine)
    if rank != 0:
        return None
    errors = [part[""] for part in hashed if "" in part]
    if errors:
        return "; ".join(errors)
    for part in hashed:
        digests.update(part)
    return dict(sorted(digests.items()))


def _gather(value: object) -> list:
    """Every rank's ``value`` on rank 0 (others: None); one process: ``[value]``."""
    import torch.distributed as dist

    rank, world, on = _dist()
    if not on:
        return [value]
    box = [None] * world if rank == 0 else None
    dist.gather_object(value, box, dst=0)
    return box


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


def _read_manifest_files(path: Path) -> tuple[dict | None, list[str]]:
    """(name -> SHA-256 of the checkpoint's manifest, []) or (None, [why it cannot be read])."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
        return files, []
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, [f"{path / MANIFEST}: missing or unreadable ({e.__class__.__name__})"]


# path -> the _signature it had when this process (or, in a job, the ranks together) verified it
_VERIFIED: dict[str, tuple] = {}


def _signature(path: Path, files: dict) -> tuple | None:
    """What must be unchanged for an earlier verification to still hold: the manifest's bytes and
    each file's inode, size, modification and change times (None when one cannot be read). A
    rewrite of a file changes its change time, which no user can set back."""
    try:
        stats = []
        for name in files:
            st = (path / name).stat()
            stats.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return (path / MANIFEST).read_bytes(), tuple(stats)
    except OSError:
        return None


def _check(path: Path, files: dict, names) -> list[tuple[str, str]]:
    """(name, problem) for each of ``names`` that is missing or does not match its digest."""
    problems = []
    for name in names:
        file = path / name
        if not file.is_file():
            problems.append((name, f"{file}: missing"))
        elif _sha256(file) != files[name]:
            problems.append((name, f"{file}: corrupt or truncated (SHA-256 mismatch)"))
    return problems


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with a checkpoint directory (empty: complete and intact). Not collective: this
    process hashes every file, unless it (or ``verify_checkpoint``) verified the same, unchanged
    checkpoint before (the resume path asks three times)."""
    path = Path(path)
    files, problems = _read_manifest_files(path)
    if files is None:
        return problems
    signature = _signature(path, files)
    if signature is not None and _VERIFIED.get(str(path.resolve())) == signature:
        return []
    problems = [problem for _, problem in _check(path, files, files)]
    if not problems and signature is not None:
        _VERIFIED[str(path.resolve())] = signature
    return problems


def verify_checkpoint(path: Path) -> list[str]:
    """``checkpoint_problems`` for every rank, collective: the files are shared out over the ranks
    (``hash_shares``), each hashes its share, rank 0's answer goes to every rank (the problems in
    the manifest's order). One process: ``checkpoint_problems``."""
    rank, world, on = _dist()
    path = Path(path)
    if not on:
        return checkpoint_problems(path)
    plan = None
    if rank == 0:
        files, problems = _read_manifest_files(path)
        signature = None if files is None else _signature(path, files)
        if files is None:
            plan = {"problems": problems}
        elif signature is not None and _VERIFIED.get(str(path.resolve())) == signature:
            plan = {"problems": []}  # verified before, unchanged since
        else:
            sizes = {}
            for name in files:
                try:
                    sizes[name] = (path / name).stat().st_size
                except OSError:
                    sizes[name] = 0  # reported as missing by the rank that gets it
            plan = {"files": files, "shares": hash_shares(sizes, world)}
    plan = _broadcast(plan)
    if "problems" in plan:
        problems = plan["problems"]
    else:
        mine = _check(path, plan["files"], plan["shares"][rank])
        found = _gather(mine)
        if rank == 0:
            order = {name: i for i, name in enumerate(plan["files"])}
            found = [
                problem
                for _, problem in sorted((p for part in found for p in part), key=lambda p: order[p[0]])
            ]
        problems = _broadcast(found)
    if not problems:  # each rank trusts the joint verification of what it sees now
        files, _ = _read_manifest_files(path)
        signature = None if files is None else _signature(path, files)
        if signature is not None:
            _VERIFIED[str(path.resolve())] = signature
    return problems


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete, intact checkpoint (chosen by rank 0 for every rank; every rank helps
    verify it: ``verify_checkpoint``); None when there is no checkpoint at all. Raises
    ``CheckpointError`` (on every rank) when checkpoints exist but none is intact: starting from
    step 0 would silently discard the run and its metrics."""
    rank = _dist()[0]
    candidates = _broadcast([str(p) for p in list_checkpoints(run_dir)] if rank == 0 else None)
    chosen, damaged = None, []
    for path in map(Path, candidates):
        problems = verify_checkpoint(path)
        if not problems:
            chosen = path
            break
        damaged.append(path.name)
        if rank == 0:
            log.warning("skipping checkpoint %s: %s; falling back to the previous one", path, problems[0])
    if chosen is None and damaged:
        root = Path(run_dir) / CHECKPOINTS
        raise CheckpointError(
            f"{root} holds {len(damaged)} checkpoint(s) ({', '.join(damaged)}) and none is complete and "
            "intact, so the run cannot continue; restore them, or delete those folders to start this "
            "run again from step 0, or start a new run in another experiment.output_dir"
        )
    return chosen


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
    problems = verify_checkpoint(path)  # free when latest_checkpoint just verified it
    if problems:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {problems[0]}")
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    problem = world_size_problem(manifest, world)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
    backend.load_training_state(Path(path) / "engine")
    source = rank if manifest["world_size"] == world else 0
    state = load_verified(Path(path) / "sparse_sup" / rank_file(source))
    return state, Path(path) / SHARDED_STATE if manifest.get("sharded_state") else None
