"""The only way the algorithm talks to other ranks.

The core never imports ``torch.distributed``: engines pass an object with this protocol. Two
instances matter per run: the *shard* group (ranks holding different pieces of the same tensor,
e.g. an FSDP2 mesh) is used by exact top-k selection; the *data-parallel* group (replicas seeing
different data) pools BatchNorm statistics and evaluation counts.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Collectives(Protocol):
    """In-place sum over a process group. Every rank must call with the same shape and dtype."""

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> None: ...


class LocalCollectives:
    """One rank, or ranks that each hold whole tensors (DDP): reductions are the identity."""

    world_size = 1
    rank = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        return None


LOCAL = LocalCollectives()
