"""Which training samples BatchNorm recalibration forwards, for every front end (the CLI loop, the
Trainer, the tests' equivalence worker): one plan, so S_i's statistics are the same whoever runs it.

Pass ``counter`` (0, 1, ...) draws its own seeded order (and, through its key epoch, augmentations of
its own); batch j holds a fixed slice of that order and goes to rank j mod W, so the pooled statistics
do not depend on the number of processes. With ``lockstep`` (collective forwards: FSDP2, ZeRO-3)
every rank has the same number of rounds; the extra ones are marked to be discarded (forward only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core.collectives import Collectives
from .data.keys import mix32, recalibration_epoch


@dataclass(frozen=True)
class RecalibrationPlan:
    epoch: int  # the key epoch of the pass's samples: (epoch, index) keys their augmentations
    rounds: list[tuple[list[int], bool]]  # this rank's batches: sample indices, discard (padding)


def recalibration_plan(
    num_samples: int,
    batch_size: int,
    num_batches: int | None,
    *,
    seed: int,
    counter: int,
    collectives: Collectives,
    lockstep: bool,
) -> RecalibrationPlan:
    """This rank's batches of pass ``counter``: at most ``num_batches`` (None: one pass over the
    ``num_samples`` training samples) of ``batch_size``. Not collective (reads world size and rank)."""
    epoch = recalibration_epoch(counter)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(mix32(seed, epoch)))
    total = num_samples // batch_size
    if num_batches is not None:
        total = min(total, num_batches)
    world, rank = collectives.world_size, collectives.rank
    mine = list(range(rank, total, world))
    num_rounds = -(-total // world) if lockstep else len(mine)
    rounds = []
    for i in range(num_rounds):
        j = mine[i] if i < len(mine) else 0
        rounds.append((order[j * batch_size : (j + 1) * batch_size].tolist(), i >= len(mine)))
    return RecalibrationPlan(epoch, rounds)
