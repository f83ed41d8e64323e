"""Sharded checkpoints across real gloo processes.

``write OUT``: every rank passes FSDP2-style dim-0 row runs (uneven, some empty) and replicated
tensors of the same seeded truth; then two bad writes that every rank must refuse together.
``read CKPT OUT``: each rank reads its own row runs and an uneven flat split of CKPT, checks them
against the truth, then all ranks write OUT together. Rank 0 writes a JSON report to OUT + ".json".
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparse_sup.checkpoint.sharded import CheckpointError, LocalPiece, load_sharded, save_sharded  # noqa: E402

# name: (shape, dtype, masked, replicated)
SPEC = {
    "conv.weight": ((5, 3, 3, 3), torch.float32, True, False),
    "fc.weight": ((10, 3), torch.bfloat16, True, False),
    "single_row": ((1, 4), torch.float32, True, False),  # one row: empty piece on every rank but 0
    "no_rows": ((0, 4), torch.float32, True, False),
    "fc.bias": ((7,), torch.float64, False, False),
    "bn.running_mean": ((6,), torch.float32, False, True),
    "bn.num_batches_tracked": ((), torch.int64, False, True),
    "head.weight": ((3, 5), torch.float32, True, True),  # replicated and masked
}
META = {"kind": "ticket", "index": 2, "density": 0.1}


def truth() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Flat (values with zeros where inactive, mask or None), identical in every process."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, (shape, dtype, masked, _) in SPEC.items():
        n = math.prod(shape)
        if dtype == torch.int64:
            values = torch.randint(0, 1000, (n,), generator=g)
        else:
            values = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        mask = torch.rand(n, generator=g) < 0.4 if masked else None
        out[name] = (
            values if mask is None else torch.where(mask, values, torch.zeros((), dtype=dtype)),
            mask,
        )
    return out


def row_run(shape: tuple[int, ...], world: int, rank: int) -> tuple[int, int]:
    """FSDP2's dim-0 placement (torch.chunk: ceil(rows / world) rows per rank, tail ranks short or
    empty) as (global flat offset, numel)."""
    if not shape:
        return (0, 1) if rank == 0 else (0, 0)
    rows, per_row = shape[0], math.prod(shape[1:])
    chunk = -(-rows // world) if rows else 0
    start, stop = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
    return start * per_row, (stop - start) * per_row


def flat_run(numel: int, world: int, rank: int) -> tuple[int, int]:
    """An uneven flat split unrelated to rows: rank r gets a share proportional to r + 1."""
    weights = [r + 1 for r in range(world)]
    cuts = [numel * sum(weights[:r]) // sum(weights) for r in range(world + 1)]
    return cuts[rank], cuts[rank + 1] - cuts[rank]


def pieces_for(world: int, rank: int, data: dict) -> dict[str, LocalPiece]:
    pieces = {}
    for name, (shape, _, _, replicated) in SPEC.items():
        values, mask = data[name]
        if replicated:  # every rank holds the whole tensor; junk where inactive must not be stored
            junk = values if mask is None else torch.where(mask, values, torch.ones_like(values))
            pieces[name] = LocalPiece(shape, 0, junk.reshape(shape), mask, replicated=True)
            continue
        offset, numel = row_run(shape, world, rank)
        run = slice(offset, offset + numel)
        rows = values[run].reshape(-1, *shape[1:])
        pieces[name] = LocalPiece(
            shape, offset, rows, None if mask is None else mask[run].reshape(rows.shape)
        )
    return pieces


def check(got: dict, data: dict, wanted: dict) -> int:
    checked = 0
    for name, (offset, numel) in wanted.items():
        values, mask = data[name]
        run = slice(offset, offset + numel)
        assert got[name][0].dtype == values.dtype, name
        assert torch.equal(got[name][0], values[run]), (name, offset, numel)
        if mask is None:
            assert got[name][1] is None, name
        else:
            assert torch.equal(got[name][1], mask[run]), (name, offset, numel)
        checked += 1
    return checked


def refused_everywhere(fn) -> str:
    """Every rank must raise CheckpointError (none may hang); returns the message."""
    try:
        fn()
    except CheckpointError as e:
        return str(e)
    raise AssertionError("a bad write was accepted")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mode, *paths = sys.argv[1:]
    data = truth()
    report: dict = {"world": world}
    if mode == "write":
        out = Path(paths[0])
        save_sharded(out, pieces_for(world, rank, data), META)
        report["exists"] = refused_everywhere(lambda: save_sharded(out, pieces_for(world, rank, data), META))
        bad = pieces_for(world, rank, data)
        if rank == world - 1:  # this rank disagrees about a global shape
            bad["fc.bias"] = LocalPiece((8,), 0, torch.zeros(0, dtype=torch.float64))
        bad_path = out.with_name("bad")
        report["disagree"] = refused_everywhere(lambda: save_sharded(bad_path, bad, META))
        report["bad_published"] = bad_path.exists()
    elif mode == "read":
        ckpt, out = Path(paths[0]), Path(paths[1])
        checked = 0
        for split in (row_run, flat_run):
            wanted = {
                name: split(shape, world, rank) if split is row_run else split(math.prod(shape), world, rank)
                for name, (shape, *_) in SPEC.items()
            }
            checked += check(load_sharded(ckpt, wanted), data, wanted)
        counts = [None] * world
        dist.all_gather_object(counts, checked)
        report["checked"] = sum(counts)
        save_sharded(out, pieces_for(world, rank, data), META)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if rank == 0:
        leftovers = [p.name for p in Path(paths[-1]).parent.iterdir() if p.name.startswith(".")]
        report["leftovers"] = leftovers
        Path(str(paths[-1]) + ".json").write_text(json.dumps(report))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
