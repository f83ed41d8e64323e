"""Debug checks of what must hold after every optimizer step (``sparse.check_invariants``): the
properties the tests assert, checked inside real runs of every engine and precision."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .collectives import Collectives
from .masks import MaskState
from .targets import Target


class InvariantError(RuntimeError):
    """A sparse invariant does not hold: a bug in an engine adapter or the algorithm, never input."""


def _nonzero_outside(tensor: torch.Tensor, keep: torch.Tensor) -> int:
    return int(torch.count_nonzero(tensor.detach().reshape(-1)[~keep.reshape(-1)]))


def check_gradients(targets: Sequence[Target], masks: MaskState, where: str) -> None:
    """Masked gradients are exactly zero where the optimizer reads them (each target's ``grad()``
    is that storage: a copy there would hide the zeroing, as ZeRO-3's bf16 accessor once did)."""
    for t in targets:
        grad = t.grad()
        if grad is not None and (n := _nonzero_outside(grad, masks.masks[t.name])):
            raise InvariantError(f"{where}: {n} masked gradient entries of {t.name} are nonzero")


def check_step(
    targets: Sequence[Target],
    masks: MaskState,
    data_parallel: Collectives,
    where: str,
    weights: bool = True,
) -> None:
    """After a step: each layer's mask holds exactly its recorded count (summed over the shard
    group), masked weights (``weights``) and masked optimizer state are exactly zero, and every
    data-parallel replica holds the same masks (one all-reduce of a checksum)."""
    recorded = dict(masks.counts)
    masks.recount()  # collective over the shard group
    if masks.counts != recorded:
        wrong = {k: (recorded[k], v) for k, v in masks.counts.items() if recorded[k] != v}
        raise InvariantError(f"{where}: per-layer counts (recorded, actual) differ: {wrong}")
    for t in targets:
        keep = masks.masks[t.name]
        tensors = ([("weight", t.param)] if weights else []) + [
            ("optimizer state", s) for s in t.optimizer_states()
        ]
        for kind, tensor in tensors:
            if n := _nonzero_outside(tensor, keep):
                raise InvariantError(f"{where}: {n} masked {kind} entries of {t.name} are nonzero")
    mine = torch.tensor([masks.checksum(targets)], dtype=torch.float64)
    total = mine.clone()
    data_parallel.all_reduce_sum(total)
    if float(total) != float(mine) * data_parallel.world_size:
        raise InvariantError(f"{where}: masks differ across data-parallel ranks")


def check_rank_agreement(
    masks: MaskState, targets: Sequence[Target], data_parallel: Collectives, where: str
) -> None:
    """Every data-parallel replica holds the same masks (a checksum all-reduced; collective)."""
    mine = torch.tensor([masks.checksum(targets)], dtype=torch.float64)
    total = mine.clone()
    data_parallel.all_reduce_sum(total)
    if float(total) != float(mine) * data_parallel.world_size:
        raise RuntimeError(f"masks differ across ranks after {where}")
