"""The ``Backend`` protocol: the one seam between the algorithm (engine, loop, merge, Trainer) and a
distributed engine. Every caller builds its backend with ``build_backend`` (in ``__init__``), which
reads the engine from the type of the prepared model — never from a name passed around.

Placement contract: ``targets()``, ``state_tensors()`` and ``layouts()`` describe *local* pieces —
the whole tensor in one process or under DDP, a contiguous run of the row-major flat elements under
FSDP2 (dim-0 shard) or ZeRO (fp32 master fragment). ``Layout`` says where a piece sits in the full
tensor, so a checkpoint written at one world size can be read at another.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..core.collectives import Collectives
from ..core.targets import Target


@dataclass(frozen=True)
class Layout:
    """Where a local piece sits: flat element ``offset`` of a full tensor of ``shape``.
    ``replicated``: every data-parallel rank holds the same whole tensor (DDP, BN buffers)."""

    shape: tuple[int, ...]
    offset: int
    replicated: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(kw_only=True)
class StepOptions:
    """How a torch-optimizer backend finishes a step (DeepSpeed does all of this itself).

    ``backward``: the function that back-propagates a loss (Accelerate's, which applies a loss
    scaler); ``scaler``: the ``GradScaler`` behind it, if any — it then decides, on overflow, to skip
    the step and lower the scale."""

    max_grad_norm: float | None = None
    skip_nonfinite: bool = True
    backward: Callable[[torch.Tensor], None] | None = None
    scaler: object | None = None


class Backend(Protocol):
    """What every engine adapter provides. ``shard`` spans ranks holding different pieces of the
    same tensors (selection); ``data_parallel`` spans replicas seeing different data (BN, eval)."""

    kind: str  # "single", "ddp", "fsdp2" or "deepspeed": for logs and summaries only
    shard: Collectives
    data_parallel: Collectives
    model: torch.nn.Module  # what the forward pass is called on (possibly wrapped)
    module: torch.nn.Module  # the user's module underneath (buffers, BN, evaluation)
    lockstep: bool  # forwards are collective: every rank must run the same number of them
    # dtype that floating-point inputs must have for ``model``/``module`` (DeepSpeed bf16/fp16 casts
    # the module itself and runs no autocast); None: leave inputs as they are (autocast decides)
    input_dtype: torch.dtype | None

    def targets(self) -> list[Target]: ...

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter (local piece; DeepSpeed: fp32 master fragment) and buffer, by name."""

    def layouts(self) -> dict[str, Layout]:
        """The ``Layout`` of every tensor of ``state_tensors()``."""

    def refresh_model_weights(self) -> None:
        """Propagate in-place changes of the targets to any other copy of the weights (DeepSpeed's
        model weights mirror its fp32 masters); a no-op where the targets are the weights."""

    def attach(self, engine) -> None:
        """Bind the sparse engine that runs around the real optimizer step."""

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward: ``enabled=False`` inside gradient accumulation."""

    def backward(self, loss: torch.Tensor, accum_steps: int) -> None:
        """Back-propagate one of ``accum_steps`` micro-batches' mean loss."""

    def optimizer_step(self) -> bool:
        """Finish the optimizer step after the last micro-batch; False if it was skipped."""

    def full_state(self) -> dict[str, torch.Tensor]:
        """Whole tensors by name (collective: gathers sharded parameters). Exports only."""

    def full_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole masks from local ones (collective). Exports and tests only."""

    def save_training_state(self, directory: Path) -> None:
        """Model and optimizer state (collective), in the engine's own sharded format."""

    def load_training_state(self, directory: Path) -> None:
        """Inverse of ``save_training_state`` at the same world size (collective)."""


class TorchOptimizerStep:
    """The step of a plain torch optimizer (one process, DDP, FSDP2), in the order SPEC requires:
    unscale once -> engine reads RigL scores and zeroes masked gradients -> clip -> step (the
    scaler decides on overflow) -> engine enforces masks and counts the step if it was applied."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, options: StepOptions | None) -> None:
        self.optimizer = optimizer
        self.options = options or StepOptions()
        self.engine = None

    def backward(self, loss: torch.Tensor, accum_steps: int) -> None:
        loss = loss / accum_steps
        (self.options.backward or torch.Tensor.backward)(loss)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _grads_finite(self, params: list[torch.Tensor]) -> bool:
        max_norm = self.options.max_grad_norm
        if max_norm:
            # after the one explicit unscale: the plain torch clip (Accelerate's would unscale again)
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            return bool(torch.isfinite(norm))
        if not self.options.skip_nonfinite or not params:
            return True
        norms = torch._foreach_norm([p.grad for p in params])
        norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
        return bool(torch.isfinite(torch.stack(norms)).all())

    def step(self) -> bool:
        engine, optimizer, scaler = self.engine, self.optimizer, self.options.scaler
        for group in optimizer.param_groups:
            group["lr"] = engine.lr()
        if scaler is not None:
            scaler.unscale_(optimizer)
        engine.before_optimizer_step()
        finite = self._grads_finite(self._params())
        if scaler is not None:  # the scaler alone decides (a non-finite gradient was found by unscale_)
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skips the step itself if unscale_ found inf/NaN
            scaler.update()
            applied = scaler.get_scale() >= scale  # an overflow lowers the scale (as Accelerate reads it)
        elif finite or not self.options.skip_nonfinite:
            optimizer.step()
            applied = True
        else:
            applied = False
        engine.after_optimizer_step(skipped=not applied)
        optimizer.zero_grad(set_to_none=True)
        return applied


@contextlib.contextmanager
def no_op_context() -> Iterator[None]:
    yield
