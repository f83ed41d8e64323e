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

    def optimizer_step(self, defer: bool = False) -> bool:
        """Finish the optimizer step after the last micro-batch; False if it was skipped.
        ``defer=True``: the skip may be decided on the device without a host read; True is then
        returned, ``last_skip`` holds the device flag and ``resolve_skips()`` the count."""

    last_skip: torch.Tensor | None  # the last deferred step's skip flag (0-dim bool), else None

    def resolve_skips(self) -> int:
        """Steps reported as taken by deferred ``optimizer_step`` calls since the last call that the
        device skipped (one host read where any was deferred)."""

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


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 gradients), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


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
        self.applied = False  # whether the last real step was applied (as far as the host knows)
        self.nonfinite_group: Collectives | None = None  # sharded gradients: reduce the flag here
        self._defer = False  # the current step may be skipped on the device (see ``step``)
        self._deferred = False
        self._own_found_inf = False
        self._lr_table: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None  # deferred steps the device skipped (int64, 0-dim)
        self.last_skip: torch.Tensor | None = None  # the last deferred step's skip flag (bool, 0-dim)

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

    def _nonfinite_flag(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """A 0-dim float tensor on the gradients' device, 1.0 where some gradient is inf/NaN, without
        a host read: one fused norm over the local gradients (the clip's total norm where clipping
        runs) and, for sharded gradients, one all-reduce over ``nonfinite_group`` (the shard group).
        None where nothing is checked."""
        max_norm = self.options.max_grad_norm
        if max_norm:
            # after the scaler's one unscale: the plain torch clip (Accelerate's would unscale again);
            # a DTensor total norm is reduced over its mesh by full_tensor(): one all-reduce
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            return (~torch.isfinite(norm)).float()
        if not self.options.skip_nonfinite or not params:
            return None
        grads = [_local(p.grad) for p in params]
        flag = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float()
        if self.nonfinite_group is not None:  # local shards: one reduction for the whole step
            self.nonfinite_group.all_reduce_sum(flag)
            flag = flag.clamp(max=1.0)
        return flag

    def _device_skip(self, optimizer, params: list[torch.Tensor]) -> bool:
        """Whether the optimizer can skip a step on the device (fused SGD/Adam/AdamW read
        ``optimizer.found_inf`` inside their kernels, step counts included) so that no host read is
        needed. Not on a fused SGD's first step: its momentum buffers would be left uninitialised
        (the next step would read garbage), so that one step reads the flag on the host."""
        if not self._defer or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return False
        if not all(g.get("fused") for g in optimizer.param_groups):
            return False
        momentum = any(g.get("momentum", 0) for g in optimizer.param_groups)
        return not momentum or all("momentum_buffer" in optimizer.state.get(p, {}) for p in params)

    def _device_lr(self) -> torch.Tensor:
        """Group 0's LR as a device tensor for a deferred step: the engine's ``step`` counts the
        deferred steps as taken, ``pending`` those of them the device skipped; the schedule is read
        at the true step from a table of ``engine.lr(s)`` (built once, on the device)."""
        engine = self._engine
        if self._lr_table is None or self._lr_table.device != self.pending.device:
            steps = engine.plan.total_steps + 1
            self._lr_table = torch.tensor(
                [engine.lr(s) for s in range(steps)], dtype=torch.float64, device=self.pending.device
            )
        return self._lr_table[(engine.step - self.pending).clamp(min=0)]

    def _before_step(self, optimizer, args, kwargs) -> None:
        """Step pre-hook: gradients are accumulated, reduced and unscaled, not yet clipped."""
        self._engine.before_optimizer_step()
        params = self._params()
        flag = self._nonfinite_flag(params)
        self._deferred = False
        self.last_skip = None
        if flag is not None and self.options.skip_nonfinite and self._device_skip(optimizer, params):
            if self.pending is None or self.pending.device != flag.device:
                self.pending = torch.zeros((), dtype=torch.int64, device=flag.device)
            set_lrs(optimizer.param_groups, self._device_lr(), self._ratios)  # before counting this step
            found = getattr(optimizer, "found_inf", None)  # a GradScaler's, on its fused path
            optimizer.found_inf = flag if found is None else torch.maximum(found.to(flag), flag)
            self._own_found_inf = found is None
            self.pending += flag.to(torch.int64)
            self.last_skip = flag > 0
            self._deferred = True
            self._skipping = False  # as far as the host knows: resolve_skips() corrects the count
            return
        self._skipping = flag is not None and self.options.skip_nonfinite and bool(flag)  # host read
        if self._skipping:  # a step without gradients changes no weight and no optimizer state
            for p in params:
                p.grad = None
        set_lrs(optimizer.param_groups, self._engine.lr(), self._ratios)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._deferred and self._own_found_inf:
            del optimizer.found_inf  # ours for this step only (a GradScaler removes its own)
        self.applied = not self._skipping
        self._engine.after_optimizer_step(skipped=self._skipping)

    def resolve_skips(self) -> int:
        """How many of the steps reported as taken since the last call the device skipped (one host
        read; none where no step was deferred). Group LRs go back to plain floats."""
        if self.pending is None:
            return 0
        skipped = int(self.pending)  # the one host read
        self.pending = None
        if self._engine is not None:
            set_lrs(self.optimizer.param_groups, self._engine.lr(self._engine.step - skipped), self._ratios)
        return skipped

    def step(self, defer: bool = False) -> bool:
        """The CLI loop's step after its last micro-batch; False if it was skipped. ``defer``: the
        caller can take the skip decision late (``resolve_skips``): where the optimizer skips on the
        device, no host read happens and True is returned; ``last_skip`` is then the device flag."""
        optimizer, scaler = self.optimizer, self.options.scaler
        self._defer, self.last_skip = defer, None
        self.applied = False  # stays False where the scaler skips the step (no hook runs)
        try:
            with self._hooked_here():
                if scaler is not None:
                    # unscaled here, once: a fused optimizer would otherwise unscale inside its own
                    # step, after the hooks saw (and clipped) scaled gradients
                    scaler.unscale_(optimizer)
                    scaler.step(optimizer)  # skips the step if unscale_ found inf/NaN (a host read
                    scaler.update()  # unless the optimizer is fused: then found_inf stays on device)
                else:
                    optimizer.step()
        finally:
            self._defer = False
        optimizer.zero_grad(set_to_none=True)
        return self.applied


class TorchStepMethods:
    """The step methods of a backend whose optimizer steps through ``self._step``, a
    ``TorchOptimizerStep`` (one process, DDP, FSDP2; DeepSpeed's engine steps itself)."""

    _step: TorchOptimizerStep

    def backward(self, loss: torch.Tensor, accum_steps: int) -> None:
        self._step.backward(loss, accum_steps)

    def optimizer_step(self, defer: bool = False) -> bool:
        return self._step.step(defer)

    @property
    def last_skip(self) -> torch.Tensor | None:
        return self._step.last_skip

    def resolve_skips(self) -> int:
        return self._step.resolve_skips()
