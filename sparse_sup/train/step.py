"""The training step of the reference loop: the run's precision, the backend that owns the step,
and one optimizer step over the accumulated micro-batches."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import torch

from ..backends import StepOptions, build_backend
from ..backends.local import unwrap_module

log = logging.getLogger(__name__)


AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def forward_autocast(precision: str, backend) -> Callable[[], contextlib.AbstractContextManager]:
    """The context of every forward of a run: the training step, evaluation, BN recalibration and a
    merge's, so that P, the tickets and S_M are measured as the model was trained, and a merge
    reproduces the run's S_M. Autocast to ``train.precision`` on the model's device, unless the
    engine computes in that dtype itself (DeepSpeed's engine: ``input_dtype``; FSDP2's
    ``MixedPrecisionPolicy``: ``casts_forward``)."""
    dtype = AUTOCAST_DTYPE.get(precision)
    if dtype is None or backend.input_dtype is not None or getattr(backend, "casts_forward", False):
        return contextlib.nullcontext
    device = next(backend.module.parameters()).device
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def build_step_backend(prepared, accelerator, model, optimizer):
    """(backend, autocast, scaler) for the wrapped ``model``: the backend owns synchronisation and
    the optimizer step; ``autocast`` is the forward's context; ``scaler`` the loss scaler, if any
    (its state joins run checkpoints)."""
    backward, scaler = accelerator.backward, accelerator.scaler
    device = next(unwrap_module(model).parameters()).device
    if prepared.config.train.precision == "fp16" and scaler is None and device.type == "cpu":
        # Accelerate runs no GradScaler on the CPU (nor fp16 autocast), so fp16 would silently be
        # fp32: run one here (the same scaler semantics as on a GPU, overflows included)
        scaler = torch.amp.GradScaler("cpu")
        backward = lambda loss: scaler.scale(loss).backward()  # noqa: E731
    optim = prepared.config.optim
    options = StepOptions(
        max_grad_norm=optim.max_grad_norm,
        skip_nonfinite=prepared.config.train.skip_nonfinite,
        backward=backward,
        scaler=scaler,
    )
    backend = build_backend(model, optimizer, prepared.target_names, options)
    return backend, forward_autocast(prepared.config.train.precision, backend), scaler


class OptimizerStep:
    """One real optimizer step over ``accum`` micro-batches, for every engine: the backend says how
    gradients synchronise and where the step happens. Returns the mean loss on the device (0 where
    a deferred step was skipped on the device), None if the host knows it was skipped.

    ``position``: the data position (steps taken, skipped ones included) that keys the on-device
    augmentation and the fault injection of ``train.nonfinite_steps`` (tests)."""

    def __init__(self, backend, train_input, autocast: Callable, device: torch.device, train_config) -> None:
        self.backend, self.data, self.autocast, self.device = backend, train_input, autocast, device
        self.channels_last = train_config.channels_last
        self.nonfinite_steps = set(train_config.nonfinite_steps)

    def __call__(self, micro, accum: int, position: int, defer: bool = False) -> torch.Tensor | None:
        backend, data = self.backend, self.data
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        inject = position in self.nonfinite_steps
        for a in range(accum):
            # on the device: crop/flip, normalise, erase, mixup (keyed by the data position)
            images, labels = data.to_device(next(micro), self.device, backend.input_dtype, position)
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with backend.gradient_sync(a == accum - 1):
                with self.autocast():
                    logits = backend.model(images)
                loss = data.loss(logits, labels)
                if inject:  # fault injection (tests): every gradient of this step becomes inf
                    loss = loss * float("inf")
                backend.backward(loss, accum)
            total += loss.detach().double() / accum
        if not backend.optimizer_step(defer=defer):
            log.warning("optimizer step skipped (non-finite gradients or overflow); no schedule advanced")
            return None
        skip = backend.last_skip
        return total if skip is None else torch.where(skip, torch.zeros_like(total), total)


class HostSteps:
    """Which completed optimizer steps make the host act: log, evaluate, checkpoint, stop, or an
    engine event (mask update, phase or cycle boundary, the end). Such a step and the steps before
    it must be known exactly, so it is never deferred (see ``Run.train``)."""

    def __init__(self, config, plan, engine, last_step: int, checkpoint_due: Callable[[int], bool]) -> None:
        self.log_every, self.engine, self.last_step = config.train.log_every, engine, last_step
        every = config.train.eval_every_epochs
        self.eval_every = max(1, round(every * plan.steps_per_epoch)) if every else None
        self.checkpoint_due = checkpoint_due

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.last_step

    def evaluates(self, step: int) -> bool:
        return self.eval_every is not None and step % self.eval_every == 0

    def acts(self, step: int) -> bool:
        return (
            self.logs(step)
            or step >= self.last_step
            or self.evaluates(step)
            or self.checkpoint_due(step)
            or self.engine.acts_after(step)
        )

    def next(self) -> int:
        """The first step after the engine's (exact) step at which the host acts."""
        step = self.engine.step + 1
        while not self.acts(step):
            step += 1
        return step
