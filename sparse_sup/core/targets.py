"""What the algorithm sees of a model: one ``Target`` per sparsified weight.

A target is the *local* piece of a weight: the whole tensor in one process or under DDP, a
contiguous run of its row-major flat elements under FSDP2 or ZeRO. Backends build targets; the
core only reads and mutates them in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _no_states() -> list[torch.Tensor]:
    return []


@dataclass(eq=False)
class Target:
    """``param`` is a plain tensor aliasing the real storage (mutate in place only); element j of
    ``param.reshape(-1)`` is flat element ``offset + j`` of the full weight of ``shape``."""

    name: str
    param: torch.Tensor
    shape: tuple[int, ...]
    offset: int = 0
    grad: Callable[[], torch.Tensor | None] = lambda: None
    optimizer_states: Callable[[], list[torch.Tensor]] = field(default=_no_states)

    @property
    def numel(self) -> int:
        """Elements of the full (unsharded) weight."""
        return math.prod(self.shape)


def whole_tensor_target(
    name: str, param: torch.nn.Parameter, optimizer: torch.optim.Optimizer | None
) -> Target:
    """Target for an unsharded parameter (one process, DDP): grads and torch-optimizer state
    tensors shaped like the parameter (momentum, Adam moments) are used as they are."""

    def states() -> list[torch.Tensor]:
        if optimizer is None:
            return []
        state = optimizer.state.get(param, {})
        return [t for t in state.values() if torch.is_tensor(t) and t.shape == param.shape]

    return Target(
        name=name,
        param=param.detach(),
        shape=tuple(param.shape),
        offset=0,
        grad=lambda: param.grad,
        optimizer_states=states,
    )
