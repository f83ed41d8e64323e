"""Batch samplers that yield ``(epoch, index)`` keys.

Training: one permutation per epoch, identical on every rank (seeded by ``mix32(seed, epoch)``),
cut into global batches of ``B`` samples. Rank ``r`` owns the contiguous block
``[r*B/W, (r+1)*B/W)`` of each global batch and walks it in ``grad_accum_steps`` micro-batches, so
micro-batch ``a`` of rank ``r`` is slice ``r*A + a`` of the global batch. Which samples form an
optimizer step therefore does not depend on ``W`` or ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .keys import mix32

Key = tuple[int, int]


class GlobalBatchSampler:
    """Per-rank micro-batches of a seeded, rank-independent global batch order."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum_steps: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        parts = world_size * grad_accum_steps
        if global_batch_size < 1 or global_batch_size % parts:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"world_size*grad_accum_steps={world_size}*{grad_accum_steps}={parts}"
            )
        steps = num_samples // global_batch_size if drop_last else math.ceil(num_samples / global_batch_size)
        if steps == 0:
            raise ValueError(
                f"num_samples={num_samples} is smaller than global_batch_size={global_batch_size}: "
                "no full batch per epoch"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.rank = rank
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.drop_last = drop_last
        self.steps_per_epoch = steps
        self.micro_batch_size = global_batch_size // parts
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch; ``start_step`` skips that many optimizer steps (mid-epoch resume)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch = epoch
        self.start_step = start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order (same on every rank)."""
        gen = torch.Generator().manual_seed(mix32(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """Sample indices of optimizer step ``step`` (all ranks, all micro-batches, in order)."""
        perm = self.permutation(epoch)
        return self._global_batch(perm, step)

    def _global_batch(self, perm: torch.Tensor, step: int) -> list[int]:
        B = self.global_batch_size
        batch = perm[step * B : (step + 1) * B]
        if len(batch) < B:  # only when drop_last=False: wrap around to fill the last batch
            batch = torch.cat([batch, perm[: B - len(batch)]])
        return batch.tolist()

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, perm = self.epoch, self.permutation(self.epoch)
        m, A = self.micro_batch_size, self.grad_accum_steps
        for step in range(self.start_step, self.steps_per_epoch):
            batch = self._global_batch(perm, step)
            for a in range(A):
                start = (self.rank * A + a) * m
                yield [(epoch, i) for i in batch[start : start + m]]

    def __len__(self) -> int:
        """Micro-batches this rank yields in the current epoch."""
        return (self.steps_per_epoch - self.start_step) * self.grad_accum_steps


class EvalShardSampler:
    """Rank ``r`` gets indices ``r, r+W, r+2W, ...`` in batches; no padding, no duplicates."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[list[Key]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield [(0, i) for i in self.indices[start : start + self.batch_size]]

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)
