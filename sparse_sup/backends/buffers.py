"""Keep replicated buffers (BatchNorm running statistics) identical on every data-parallel rank."""

from __future__ import annotations

import torch

from ..core.collectives import Collectives


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, collectives: Collectives) -> None:
    """Average floating-point buffers over ranks (one all-reduce). Neither FSDP2 nor the end of a
    DDP step leaves them equal: each rank updates running stats from its own micro-batches."""
    if collectives.world_size == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])
    collectives.all_reduce_sum(flat)
    flat /= collectives.world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
