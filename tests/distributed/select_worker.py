"""Exact top-k over real shards: every rank holds a contiguous (uneven, possibly empty) slice of
the same vectors; rank 0 checks the union against a stable sort of the whole vector."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparse_sup.backends.collectives import ProcessGroupCollectives  # noqa: E402
from sparse_sup.core.select import Piece, top_k_masks  # noqa: E402


def vectors(trial: int, g: torch.Generator) -> torch.Tensor:
    n = int(torch.randint(0, 40, (1,), generator=g))
    kind = trial % 5
    if kind == 0:
        return torch.randn(n, generator=g)
    if kind == 1:
        return torch.randint(-2, 3, (n,), generator=g).float()  # heavy ties
    if kind == 2:
        return torch.full((n,), 0.5)  # all equal
    if kind == 3:
        v = torch.zeros(n)
        v[torch.rand(n, generator=g) < 0.5] = -0.0
        return v  # -0.0 ties +0.0
    return torch.randn(n, generator=g, dtype=torch.float64).round(decimals=1)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    coll = ProcessGroupCollectives()
    g = torch.Generator().manual_seed(99)  # same stream on every rank
    checked = 0
    for trial in range(150):
        groups = [vectors(trial + i, g) for i in range(3)]
        largest = bool(trial % 2)
        k = [int(torch.randint(0, len(v) + 1, (1,), generator=g)) for v in groups]
        pieces = []
        for gid, v in enumerate(groups):
            cuts = sorted(torch.randint(0, len(v) + 1, (world - 1,), generator=g).tolist())
            bounds = [0] + cuts + [len(v)]
            a, b = bounds[rank], bounds[rank + 1]
            pieces.append(Piece(v[a:b], gid, a))
        masks = top_k_masks(pieces, k, coll, largest=largest)
        gathered = [None] * world
        dist.all_gather_object(gathered, [(p.offset, m) for p, m in zip(pieces, masks)])
        if rank == 0:
            for gid, v in enumerate(groups):
                full = torch.zeros(len(v), dtype=torch.bool)
                for per_rank in gathered:
                    offset, m = per_rank[gid]
                    full[offset : offset + len(m)] = m
                key = v + 0.0
                order = torch.sort(key, descending=largest, stable=True).indices
                expected = torch.zeros(len(v), dtype=torch.bool)
                expected[order[: k[gid]]] = True
                assert torch.equal(full, expected), (trial, gid, v, k[gid], full, expected)
                if k[gid]:
                    ref = torch.topk(v, k[gid], largest=largest).values.sort().values
                    assert torch.equal(v[full].sort().values, ref)
                checked += 1
    if rank == 0:
        Path(sys.argv[1]).write_text(str(checked))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
