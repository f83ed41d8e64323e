"""``Collectives`` over a real ``torch.distributed`` process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


class ProcessGroupCollectives:
    """Sums over ``group`` (None: the default group). On gloo, tensors stay where they are; NCCL
    reduces CUDA tensors only, so a CPU tensor (a count, a checksum) goes through the current CUDA
    device and back."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self.device is None or tensor.device == self.device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return
        staged = tensor.to(self.device)
        dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=self.group)
        tensor.copy_(staged)


def data_parallel_collectives():
    """The default group when torch.distributed is initialised with >1 rank, else LOCAL."""
    from ..core.collectives import LOCAL

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCollectives()
    return LOCAL
