"""Compact sharded checkpoints for tickets and superposed models.

Layout of a checkpoint directory ``path``::

    manifest.json               format/version, world size, per-tensor shape/dtype/masked, per file:
                                sha256, byte size and the flat ranges it holds (with byte spans), meta
    shard-00000-of-00002.bin    rank 0's bytes: for each of its runs the active values (masked
                                tensors) or all values, then a packed bit mask (np.packbits order)

Every rank writes only its own run of each tensor (a contiguous range of the row-major flattened
full tensor), so a write never gathers a tensor and its extra memory is one piece's active values at
a time (rank 0 also holds every file's ranges: O(tensors x world) metadata). A reader at any world
size asks for its own ranges and opens only the files that overlap them. The directory is written
under a hidden temporary sibling name (``.NAME.tmp-*``, with its writer's pid@host) and published
by one atomic rename after every rank finished, so a crash leaves the previous state plus at most
that hidden directory, never a half checkpoint; the next save into the same folder removes such
directories once their writer is gone. ``path`` must be on a filesystem every rank sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..progress import progress
from .files import _atomic_write_bytes, _fsync_dir, owner_tag, remove_stale

log = logging.getLogger(__name__)

FORMAT = "sparse_sup.sharded"
VERSION = 1
MANIFEST = "manifest.json"
_ALIGN = 64  # every span starts aligned, so any dtype can be viewed in place
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A sharded checkpoint cannot be written or read; the message names the file and the fix."""


@dataclass
class LocalPiece:
    """One rank's contiguous run of a tensor's row-major flattened full form (see module doc)."""

    shape: tuple[int, ...]
    offset: int
    values: torch.Tensor
    mask: torch.Tensor | None = None
    replicated: bool = False
    replica: int = 0  # > 0: another rank (replica 0) holds and writes this same run


def replicated_pieces(
    named: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> dict[str, LocalPiece]:
    """Pieces for tensors every rank holds whole (one process, DDP); ``masks`` may name a subset."""
    unknown = sorted(set(masks) - set(named))
    if unknown:
        raise CheckpointError(
            f"masks given for tensors that are not in the state: {unknown}; pass matching names"
        )
    return {
        name: LocalPiece(tuple(t.shape), 0, t, masks.get(name), replicated=True) for name, t in named.items()
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: object) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _split(numel: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s share [start, stop) of ``numel`` items split into ``world`` near-equal runs."""
    base, extra = divmod(numel, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.bin"


# ---- writing ------------------------------------------------------------------------------------


def _local_run(
    name: str, piece: LocalPiece, rank: int, world: int
) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(global offset, flat values, flat mask) this rank writes for ``piece``; validates it."""
    shape = tuple(piece.shape)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CheckpointError(f"tensor {name!r}: shape {shape} is not a tuple of non-negative ints")
    total = math.prod(shape)
    values = piece.values.detach().reshape(-1)
    mask = None if piece.mask is None else piece.mask.detach().reshape(-1)
    if mask is not None and (mask.dtype != torch.bool or mask.numel() != values.numel()):
        raise CheckpointError(
            f"tensor {name!r}: mask must be bool with {values.numel()} elements, got {mask.dtype} "
            f"with {mask.numel()}; pass the mask of this rank's run"
        )
    offset = piece.offset
    if piece.replica:  # an empty run: replica 0 writes these values
        values, mask = values[:0], None if mask is None else mask[:0]
    if piece.replicated:
        if offset != 0 or values.numel() != total:
            raise CheckpointError(
                f"tensor {name!r}: replicated=True needs the whole tensor at offset 0 ({total} elements), "
                f"got {values.numel()} at offset {offset}"
            )
        start, stop = _split(total, world, rank)  # ranks split the writing; nothing is written twice
        offset, values = start, values[start:stop]
        mask = None if mask is None else mask[start:stop]
    elif not (isinstance(offset, int) and 0 <= offset and offset + values.numel() <= total):
        raise CheckpointError(
            f"tensor {name!r}: run [{offset}, {offset}+{values.numel()}) lies outside its {total} elements "
            f"(shape {shape}); pass the global flat offset of values[0]"
        )
    return offset, values.cpu().contiguous(), None if mask is None else mask.cpu().contiguous()


_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(values: torch.Tensor) -> np.ndarray:
    """The bytes of 1-D ``values`` as a numpy array of one element per value (no copy): numpy's
    boolean indexing then allocates only the active values (torch.masked_select on CPU also builds
    an int64 prefix sum over the whole piece)."""
    itemsize = values.element_size()
    if itemsize in _RAW:
        return values.view(_RAW[itemsize]).numpy()
    return values.view(torch.uint8).numpy().reshape(-1, itemsize)  # e.g. complex128: one row per value


def _write_rank_file(file_path: Path, pieces: dict[str, LocalPiece], rank: int, world: int) -> dict:
    """Write this rank's file, streaming one piece at a time; returns its manifest record."""
    digest, pos, entries, tensors = hashlib.sha256(), 0, [], {}
    with open(file_path, "wb") as f:

        def emit(buffer: np.ndarray) -> list[int]:
            nonlocal pos
            pad = -pos % _ALIGN
            if pad:
                f.write(bytes(pad))
                digest.update(bytes(pad))
                pos += pad
            view = memoryview(buffer).cast("B")
            f.write(view)
            digest.update(view)
            pos += len(view)
            return [pos - len(view), len(view)]

        for name, piece in progress(pieces.items(), total=len(pieces), desc="write", unit="tensor"):
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"tensor names must be non-empty strings, got {name!r}")
            offset, values, mask = _local_run(name, piece, rank, world)
            tensors[name] = {
                "shape": list(piece.shape),
                "dtype": _dtype_name(values.dtype),
                "masked": mask is not None,
            }
            if values.numel() == 0:
                continue
            data = _raw(values) if mask is None else _raw(values)[mask.numpy()]
            entry = {"tensor": name, "offset": offset, "numel": values.numel(), "active": data.shape[0]}
            entry["values"] = emit(data)
            del data
            if mask is not None:
                entry["mask"] = emit(np.packbits(mask.numpy()))
            entries.append(entry)
        f.flush()
        os.fsync(f.fileno())
    return {
        "name": file_path.name,
        "rank": rank,
        "bytes": pos,
        "sha256": digest.hexdigest(),
        "entries": entries,
        "tensors": tensors,
    }


def _merge_records(records: list[dict], world: int, meta: dict) -> dict:
    """Rank 0: one manifest from every rank's record; raises on disagreement or bad coverage."""
    tensors: dict[str, dict] = {}
    for record in records:
        for name, info in record.pop("tensors").items():
            seen = tensors.setdefault(name, {**info, "numel": math.prod(info["shape"])})
            if {k: seen[k] for k in info} != info:
                raise CheckpointError(
                    f"tensor {name!r}: rank {record['rank']} passes {info} but another rank passed "
                    f"{ {k: seen[k] for k in info} }; every rank must describe the same global tensor"
                )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "world_size": world,
        "tensors": dict(sorted(tensors.items())),
        "files": records,
        "meta": meta,
    }
    manifest["digest"] = _manifest_digest(manifest)
    problems = _manifest_problems(manifest)
    if problems:
        raise CheckpointError(
            "; ".join(problems[:5]) + " -- each rank must pass a disjoint run of every tensor, together "
            "covering it (replicated=True for tensors every rank holds whole)"
        )
    return manifest


def _collective(group) -> tuple[int, int, bool]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group), True
    return 0, 1, False


def _broadcast(value: object, group, on: bool) -> object:
    if not on:
        return value
    box = [value]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def _is_tmp(name: str) -> bool:
    """A sharded checkpoint's temporary directory name (``.NAME.tmp-HEX`` + owner tag)."""
    return name.startswith(".") and re.search(r"\.tmp-[0-9a-f]{12}(-\d+@[^@/]+)?$", name) is not None


def save_sharded(path: str | Path, pieces: dict[str, LocalPiece], meta: dict, group=None) -> dict[str, str]:
    """Collective over ``group`` (default group when torch.distributed is initialised, else one
    process): each rank writes one file with its pieces, rank 0 the manifest; published by an atomic
    rename once every rank finished. An existing ``path`` is never overwritten. ``meta`` (JSON) is
    taken from rank 0. Issues two ``broadcast_object_list`` and one ``gather_object`` (checksums
    and ranges, no tensors); any rank's failure is raised on every rank, so none hangs. Returns the
    SHA-256 of each file this rank wrote (its shard; rank 0 also the manifest), by name in ``path``,
    computed from the bytes as they were written."""
    path = Path(path)
    rank, world, on = _collective(group)
    plan: dict = {}
    if rank == 0:
        try:
            json.dumps(meta)
            if path.exists() or path.is_symlink():
                raise CheckpointError(
                    f"{path} already exists; a checkpoint is never overwritten -- delete or rename it first"
                )
            remove_stale(path.parent, lambda name: _is_tmp(name) and (path.parent / name).is_dir())
            tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}{owner_tag()}"
            tmp.mkdir(parents=True)
            plan = {"tmp": str(tmp)}
        except (TypeError, ValueError, OSError) as e:
            plan = {"error": f"{path}: {e}" if not isinstance(e, CheckpointError) else str(e)}
    plan = _broadcast(plan, group, on)
    if "error" in plan:
        raise CheckpointError(plan["error"])
    tmp = Path(plan["tmp"])
    try:
        record = _write_rank_file(tmp / _shard_name(rank, world), pieces, rank, world)
    except Exception as e:  # gathered and raised on every rank, so no rank hangs
        record = {"error": f"rank {rank}: {e}"}
    written = {} if "error" in record else {record["name"]: record["sha256"]}
    records = [record]
    if on:  # only rank 0 holds every rank's ranges (O(tensors x world) metadata)
        records = [None] * world if rank == 0 else None
        dist.gather_object(record, records, group=group, group_dst=0)
    outcome = "ok"
    if rank == 0:
        try:
            errors = [r["error"] for r in records if "error" in r]
            if errors:
                raise CheckpointError(f"writing {path} failed: " + "; ".join(errors))
            manifest = _merge_records(records, world, meta)
            text = json.dumps(manifest, indent=1).encode()
            _atomic_write_bytes(tmp / MANIFEST, text)
            written[MANIFEST] = hashlib.sha256(text).hexdigest()
            _fsync_dir(tmp)
            if path.exists() or path.is_symlink():
                raise CheckpointError(
                    f"{path} appeared while writing; not overwritten -- delete or rename it"
                )
            os.rename(tmp, path)
            _fsync_dir(path.parent)
            size = sum(r["bytes"] for r in records)
            log.info("wrote sharded checkpoint %s (%d files, %.2f MB)", path, world, size / 1e6)
        except Exception as e:  # every rank raises it after the broadcast; nothing is published
            outcome = str(e) if isinstance(e, CheckpointError) else f"writing {path} failed: {e!r}"
            shutil.rmtree(tmp, ignore_errors=True)
    outcome = _broadcast(outcome, group, on)
    if outcome != "ok":
        raise CheckpointError(outcome)
    return written


# ---- reading ------------------------------------------------------------------------------------


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _is_int(x: object, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _span_ok(span: object, size: int) -> bool:
    return isinstance(span, list) and len(span) == 2 and all(map(_is_int, span)) and sum(span) <= size


def _manifest_problems(m: dict) -> list[str]:
    """Structural problems of a manifest (no file is read): types, spans, full coverage."""
    if m.get("format") != FORMAT:
        return [f"not a {FORMAT} manifest (format={m.get('format')!r})"]
    if m.get("version") != VERSION:
        return [
            f"format version {m.get('version')!r} is not {VERSION}; read it with the sparse_sup that wrote it"
        ]
    files, tensors, world = m.get("files"), m.get("tensors"), m.get("world_size")
    if not (
        isinstance(files, list) and isinstance(tensors, dict) and _is_int(world, 1) and len(files) == world
    ):
        return ["files/tensors/world_size are missing or disagree"]
    problems: list[str] = []
    for name, t in tensors.items():
        shape = t.get("shape") if isinstance(t, dict) else None
        if not (isinstance(shape, list) and all(map(_is_int, shape)) and t.get("numel") == math.prod(shape)):
            problems.append(f"tensor {name!r}: bad shape/numel {t}")
        elif _dtype_of(t.get("dtype")) is None or not isinstance(t.get("masked"), bool):
            problems.append(f"tensor {name!r}: bad dtype/masked {t}")
    if problems:
        return problems
    runs: dict[str, list[tuple[int, int, int]]] = {name: [] for name in tensors}
    for i, f in enumerate(files):
        if not (isinstance(f, dict) and f.get("rank") == i and f.get("name") == _shard_name(i, world)):
            problems.append(f"file record {i} is malformed")
            continue
        size, label = f.get("bytes"), f["name"]
        if not (_is_int(size) and isinstance(f.get("sha256"), str) and isinstance(f.get("entries"), list)):
            problems.append(f"{label}: bad bytes/sha256/entries")
            continue
        for e in f["entries"]:
            t = tensors.get(e.get("tensor")) if isinstance(e, dict) else None
            if t is None or not all(_is_int(e.get(k)) for k in ("offset", "numel", "active")):
                problems.append(f"{label}: malformed entry {e}")
                continue
            itemsize = _dtype_of(t["dtype"]).itemsize
            stored = e["active"] if t["masked"] else e["numel"]
            values, mask = e.get("values"), e.get("mask")
            if (
                e["offset"] + e["numel"] > t["numel"]
                or e["active"] > e["numel"]
                or not _span_ok(values, size)
                or values[1] != stored * itemsize
                or (t["masked"] and not (_span_ok(mask, size) and mask[1] == (e["numel"] + 7) // 8))
                or (not t["masked"] and mask is not None)
            ):
                problems.append(f"{label}: entry of {e['tensor']!r} has inconsistent ranges {e}")
                continue
            runs[e["tensor"]].append((e["offset"], e["offset"] + e["numel"], i))
    for name, spans in runs.items():
        pos = 0
        for start, stop, i in sorted(spans):
            if start != pos:
                what = (
                    "is held by no file"
                    if start > pos
                    else f"is held twice (again by {_shard_name(i, world)})"
                )
                problems.append(f"tensor {name!r}: flat range [{min(start, pos)}, {max(start, pos)}) {what}")
            pos = max(pos, stop)
        if pos != tensors[name]["numel"]:
            problems.append(
                f"tensor {name!r}: flat range [{pos}, {tensors[name]['numel']}) is held by no file"
            )
    return problems


def _load_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        hint = (
            "it is not a sharded checkpoint" if not path.is_dir() else "an interrupted write never publishes"
        )
        raise CheckpointError(f"{file}: missing ({hint}); use another checkpoint or re-create it")
    try:
        manifest = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt, not JSON ({e}); re-create the checkpoint") from None
    if not isinstance(manifest, dict) or manifest.get("digest") != _manifest_digest(manifest):
        raise CheckpointError(
            f"{file}: corrupt (its digest does not match its content); re-create the checkpoint"
        )
    return manifest


def read_manifest(path: str | Path) -> dict:
    """The validated manifest of the checkpoint at ``path`` (raises CheckpointError)."""
    path = Path(path)
    manifest = _load_manifest(path)
    problems = _manifest_problems(manifest)
    if problems:
        raise CheckpointError(
            f"{path / MANIFEST}: " + "; ".join(problems[:5]) + " -- re-create the checkpoint"
        )
    return manifest


def _read_verified(path: Path, record: dict) -> bytearray:
    file = path / record["name"]
    try:
        size = file.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(
                f"{file}: {size} bytes, the manifest says {record['bytes']} (truncated or replaced); "
                "re-create the checkpoint or restore the file"
            )
        buffer = bytearray(size)
        with open(file, "rb") as f:
            got = f.readinto(buffer)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; restore it or re-create the checkpoint") from None
    if got != size or hashlib.sha256(buffer).hexdigest() != record["sha256"]:
        raise CheckpointError(
            f"{file}: SHA-256 mismatch (corrupt); restore the file or re-create the checkpoint"
        )
    return buffer


def _extract(buffer: bytearray, entry: dict, dtype: torch.dtype, lo: int, hi: int, dst, out) -> None:
    """Copy global range [lo, hi) of ``entry`` into ``out`` (values, mask) at position ``dst``."""
    a, b = lo - entry["offset"], hi - entry["offset"]
    start, itemsize = entry["values"][0], dtype.itemsize
    values, mask = out
    if mask is None:
        src = torch.frombuffer(buffer, dtype=dtype, count=b - a, offset=start + a * itemsize)
        values[dst : dst + b - a].copy_(src)
        return
    bits = np.frombuffer(buffer, np.uint8, count=(b + 7) // 8, offset=entry["mask"][0])
    local = np.unpackbits(bits, count=b).view(bool)
    before, sel = int(np.count_nonzero(local[:a])), local[a:]
    mask[dst : dst + b - a].numpy()[:] = sel
    count = int(np.count_nonzero(sel))
    if count:  # numpy boolean assignment: ~5x faster than torch's masked_scatter_ on CPU
        target = _raw(values[dst : dst + b - a])
        src = np.frombuffer(buffer, np.uint8, count=count * itemsize, offset=start + before * itemsize)
        target[sel] = src.view(target.dtype).reshape(-1, *target.shape[1:])


def load_sharded(
    path: str | Path, wanted: dict[str, tuple[int, int]] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Not collective. ``wanted``: name -> (global flat offset, numel) of the caller's run; None =
    every tensor whole. Returns name -> (1-D values in the stored dtype, zeros where inactive;
    1-D bool mask or None). Opens only files overlapping the wanted ranges, each verified first."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors = manifest["tensors"]
    if wanted is None:
        wanted = {name: (0, t["numel"]) for name, t in tensors.items()}
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{path / MANIFEST}: no tensor(s) {missing}; it holds {len(tensors)} tensors, e.g. "
            f"{list(tensors)[:5]} -- check the model and the checkpoint match"
        )
    held: dict[str, list[tuple[int, dict]]] = {}
    for i, record in enumerate(manifest["files"]):
        for e in record["entries"]:
            held.setdefault(e["tensor"], []).append((i, e))
    out, jobs = {}, {}
    for name, (offset, numel) in wanted.items():
        t = tensors[name]
        if not (_is_int(offset) and _is_int(numel) and offset + numel <= t["numel"]):
            raise CheckpointError(
                f"{name!r}: wanted run ({offset}, {numel}) lies outside its {t['numel']} elements"
            )
        dtype = _dtype_of(t["dtype"])
        out[name] = (
            torch.zeros(numel, dtype=dtype),
            torch.zeros(numel, dtype=torch.bool) if t["masked"] else None,
        )
        for i, e in held.get(name, []):
            lo, hi = max(offset, e["offset"]), min(offset + numel, e["offset"] + e["numel"])
            if lo < hi:
                jobs.setdefault(i, []).append((name, e, dtype, lo, hi, lo - offset))
    for i in sorted(jobs):  # one verified file in memory at a time
        buffer = _read_verified(path, manifest["files"][i])
        for name, e, dtype, lo, hi, dst in progress(jobs[i], desc=f"read {path.name}", unit="tensor"):
            _extract(buffer, e, dtype, lo, hi, dst, out[name])
        del buffer
    return out


def verify_sharded(path: str | Path) -> list[str]:
    """Every problem found (empty = healthy): manifest, each file's size and SHA-256, each masked
    run's bit count, coverage of every tensor's full range. Streams files; reads all of them."""
    path = Path(path)
    try:
        manifest = _load_manifest(path)
    except CheckpointError as e:
        return [str(e)]
    problems = [f"{path / MANIFEST}: {p}" for p in _manifest_problems(manifest)]
    if problems:
        return problems
    for record in manifest["files"]:
        file = path / record["name"]
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        if file.stat().st_size != record["bytes"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, the manifest says {record['bytes']}")
            continue
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != record["sha256"]:
            problems.append(f"{file}: SHA-256 mismatch (corrupt)")
            continue
        with open(file, "rb") as f:
            for e in record["entries"]:
                if "mask" in e:
                    f.seek(e["mask"][0])
                    bits = np.frombuffer(f.read(e["mask"][1]), np.uint8)
                    if int(np.unpackbits(bits, count=e["numel"]).sum()) != e["active"]:
                        problems.append(
                            f"{file}: mask of {e['tensor']!r} does not hold {e['active']} active bits"
                        )
    return problems
