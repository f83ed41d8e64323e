"""``Collectives`` over a real ``torch.distributed`` process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


class ProcessGroupCollectives:
    """Sums over ``group`` (None: the default group). On gloo, tensors stay where they are."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)


def data_parallel_collectives():
    """The default group when torch.distributed is initialised with >1 rank, else LOCAL."""
    from ..core.collectives import LOCAL

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCollectives()
    return LOCAL
