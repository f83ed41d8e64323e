"""One process, or DDP: every rank holds whole tensors, so selection needs no collective
(``shard`` is local) and only BN statistics and evaluation reduce over the data-parallel group.
Masks are identical across DDP ranks by construction: gradients are already all-reduced and
random choices come from counter-based keys."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..core.collectives import LOCAL, Collectives
from ..core.names import normalize_name
from ..core.targets import Target, whole_tensor_target
from .base import Layout, StepOptions, TorchOptimizerStep, TorchStepMethods
from .dcp import dcp_load, dcp_save


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The torch optimizer under Accelerate's wrapper (which proxies ``.optimizer``)."""
    while (
        optimizer is not None
        and hasattr(optimizer, "optimizer")
        and not isinstance(optimizer, torch.optim.Optimizer)
    ):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap_module(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


class LocalBackend(TorchStepMethods):
    """Whole-tensor targets on ``model`` (possibly DDP- or compile-wrapped: names are normalised)."""

    lockstep = False
    input_dtype = None  # autocast (Accelerate's mixed precision) casts inside the forward

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        target_names: list[str],
        data_parallel: Collectives = LOCAL,
        options: StepOptions | None = None,
    ) -> None:
        self.model = model
        self.module = unwrap_module(model)
        self.optimizer = unwrap_optimizer(optimizer)
        self.target_names = [normalize_name(n) for n in target_names]
        self.shard: Collectives = LOCAL
        self.data_parallel = data_parallel
        self.kind = "ddp" if data_parallel.world_size > 1 else "single"
        self._step = TorchOptimizerStep(self.optimizer, options)

    def targets(self) -> list[Target]:
        params = {normalize_name(n): p for n, p in self.model.named_parameters()}
        missing = [n for n in self.target_names if n not in params]
        if missing:
            raise KeyError(f"target parameters not found in the model: {missing[:5]}")
        return [whole_tensor_target(n, params[n], self.optimizer) for n in self.target_names]

    def refresh_model_weights(self) -> None:
        """Targets alias the model's own weights: nothing to propagate."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer (detached views), in state_dict order."""
        return {normalize_name(n): t.detach() for n, t in self.model.state_dict(keep_vars=True).items()}

    def layouts(self) -> dict[str, Layout]:
        return {n: Layout(tuple(t.shape), 0, True) for n, t in self.state_tensors().items()}

    # ---- the step ------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        self._step.engine = engine

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if not enabled and hasattr(self.model, "no_sync"):
            return self.model.no_sync()  # DDP: accumulate locally, all-reduce on the last micro-batch
        return contextlib.nullcontext()

    # ---- whole tensors and checkpoints ------------------------------------------------------------
    def full_state(self) -> dict[str, torch.Tensor]:
        return {normalize_name(k): v for k, v in self.model.state_dict().items()}

    def full_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return masks

    def save_training_state(self, directory: Path) -> None:
        dcp_save(self.module, self.optimizer, directory)

    def load_training_state(self, directory: Path) -> None:
        dcp_load(self.module, self.optimizer, directory)
