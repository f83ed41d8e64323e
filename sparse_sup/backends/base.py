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
import weakref
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
    replica: int = 0  # HSDP: index among the ranks holding this same piece; only replica 0 writes it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(kw_only=True)
class StepOptions:
    """How a torch-optimizer backend finishes a step (DeepSpeed does all of this itself).

    ``backward``: the function that back-propagates a loss (Accelerate's, which applies a loss
    scaler); ``scaler``: the ``GradScaler`` behind it, if any — it then decides, on overflow, to skip
    the step and lower the scale. ``external_step``: someone else calls ``optimizer.step()`` (the
    Trainer through Accelerate, which drives the scaler itself): the engine is hooked into it for
    good, instead of only around ``optimizer_step()``."""

    max_grad_norm: float | None = None
    skip_nonfinite: bool = True
    backward: Callable[[torch.Tensor], None] | None = None
    scaler: object | None = None
    external_step: bool = False


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


def lr_ratios(param_groups: list[dict]) -> list[float]:
    """Each parameter group's LR relative to group 0's (layer-wise decay, a head at its own LR): from
    ``initial_lr``, which a torch scheduler records, else from the LR the group holds now."""
    lrs = [group.get("initial_lr", group["lr"]) for group in param_groups]
    return [lr / lrs[0] if lrs[0] else 1.0 for lr in lrs]


def set_lrs(param_groups: list[dict], lr: float, ratios: list[float]) -> None:
    """Group 0 at ``lr`` (the engine's: the base schedule, then the cycle triangle), every other group
    at its ratio of it."""
    for group, ratio in zip(param_groups, ratios, strict=True):
        group["lr"] = ratio * lr


def stepping_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The torch optimizer that takes the step, under wrappers that proxy ``.optimizer`` (Accelerate's
    ``AcceleratedOptimizer`` subclasses ``torch.optim.Optimizer`` but has no step hooks of its own)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


# optimizer -> handles of the step hooks of the one engine running inside it (a later engine, e.g. a
# second Trainer.train(), replaces them instead of running beside them)
_hooked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TorchOptimizerStep:
    """The real step of a plain torch optimizer (one process, DDP, FSDP2), in the order SPEC requires:
    [a scaler unscales once and skips the step on overflow: nothing below runs] -> engine reads RigL
    scores and zeroes masked gradients -> clip -> LR of each group -> step -> engine enforces masks and
    counts the step. A non-finite gradient (``skip_nonfinite``) skips the step: it counts for nothing.

    The engine runs in torch's step pre/post hooks of the optimizer, so the same code runs whoever
    calls ``optimizer.step()``: ``step()`` here (the CLI loop; hooks armed for that call only, so code
    that drives the engine by hand around its own ``optimizer.step()`` is left alone), or, with
    ``StepOptions.external_step``, the Trainer and Accelerate (hooks armed when the engine attaches;
    they fire inside Accelerate's GradScaler path too, which swaps the optimizer's ``step`` method)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, options: StepOptions | None) -> None:
        # the torch optimizer itself, never Accelerate's wrapper: it has no step hooks, and its step()
        # would run its GradScaler (the same one as ``options.scaler``) a second time
        self.optimizer = stepping_optimizer(optimizer)
        self.options = options or StepOptions()
        self._engine = None
        self._ratios: list[float] = []
        self._skipping = False
        self.applied = False  # whether the last real step was applied

    @property
    def engine(self):
        return self._engine

    @engine.setter
    def engine(self, engine) -> None:
        """The backend's ``attach``: bind the engine (and, for an external caller, hook it in now)."""
        self._engine = engine
        if self.optimizer is not None:
            self._ratios = lr_ratios(self.optimizer.param_groups)
            if self.options.external_step:
                self._hook()

    def _hook(self) -> None:
        optimizer = self.optimizer
        for handle in _hooked.pop(optimizer, ()):
            handle.remove()
        pre = optimizer.register_step_pre_hook(self._before_step)
        post = optimizer.register_step_post_hook(self._after_step)
        # first of their kind, whenever others were registered: any other hook sees the gradient the
        # step uses (masked, clipped) and the weights it left (masked)
        optimizer._optimizer_step_pre_hooks.move_to_end(pre.id, last=False)
        optimizer._optimizer_step_post_hooks.move_to_end(post.id, last=False)
        _hooked[optimizer] = (pre, post)

    @contextlib.contextmanager
    def _hooked_here(self) -> Iterator[None]:
        if self.options.external_step:
            yield
            return
        self._hook()
        try:
            yield
        finally:
            for handle in _hooked.pop(self.optimizer, ()):
                handle.remove()

    def backward(self, loss: torch.Tensor, accum_steps: int) -> None:
        loss = loss / accum_steps
        (self.options.backward or torch.Tensor.backward)(loss)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _grads_finite(self, params: list[torch.Tensor]) -> bool:
        max_norm = self.options.max_grad_norm
        if max_norm:
            # after the scaler's one unscale: the plain torch clip (Accelerate's would unscale again)
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            return bool(torch.isfinite(norm))
        if not self.options.skip_nonfinite or not params:
            return True
        norms = torch._foreach_norm([p.grad for p in params])
        norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
        return bool(torch.isfinite(torch.stack(norms)).all())

    def _before_step(self, optimizer, args, kwargs) -> None:
        """Step pre-hook: gradients are accumulated, reduced and unscaled, not yet clipped."""
        self._engine.before_optimizer_step()
        params = self._params()
        self._skipping = not self._grads_finite(params) and self.options.skip_nonfinite
        if self._skipping:  # a step without gradients changes no weight and no optimizer state
            for p in params:
                p.grad = None
        set_lrs(optimizer.param_groups, self._engine.lr(), self._ratios)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.applied = not self._skipping
        self._engine.after_optimizer_step(skipped=self._skipping)

    def step(self) -> bool:
        """The CLI loop's step after its last micro-batch; False if it was skipped."""
        optimizer, scaler = self.optimizer, self.options.scaler
        self.applied = False  # stays False where the scaler skips the step (no hook runs)
        with self._hooked_here():
            if scaler is not None:
                # unscaled here, once: a fused optimizer would otherwise unscale inside its own step,
                # after the hooks saw (and clipped) scaled gradients
                scaler.unscale_(optimizer)
                scaler.step(optimizer)  # skips the step itself if unscale_ found inf/NaN
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return self.applied
