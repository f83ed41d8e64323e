"""Engine adapters: how each distributed engine exposes local pieces, gradients, optimizer state,
the optimizer step and collectives to the algorithm. ``build_backend`` is the one constructor
every caller uses (the loop, ``merge``, the Trainer integration, the tests)."""

from __future__ import annotations

import sys

import torch

from .base import Backend, Layout, StepOptions
from .collectives import data_parallel_collectives
from .local import LocalBackend


def _is_deepspeed_engine(model: object) -> bool:
    deepspeed = sys.modules.get("deepspeed")  # never import it here: only a DeepSpeed job has one
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def _is_fsdp2(model: object) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def build_backend(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    target_names: list[str],
    options: StepOptions | None = None,
) -> Backend:
    """The backend for a *prepared* model, read from its type: a ``DeepSpeedEngine`` (ZeRO 1-3),
    a ``fully_shard``-ed module (FSDP2), or anything else (one process, DDP, compiled) with the
    default process group as its data-parallel group. ``options`` apply to torch optimizers."""
    if _is_deepspeed_engine(model):
        from .deepspeed import ZERO_BACKENDS

        stage = model.zero_optimization_stage()
        if stage not in ZERO_BACKENDS:
            raise ValueError(f"sparse_sup needs ZeRO stage 1, 2 or 3 with DeepSpeed, got stage {stage}")
        return ZERO_BACKENDS[stage](model, target_names)
    if _is_fsdp2(model):
        from .fsdp2 import FSDP2Backend

        return FSDP2Backend(model, optimizer, target_names, options=options)
    return LocalBackend(model, optimizer, target_names, data_parallel_collectives(), options)


__all__ = ["Backend", "Layout", "LocalBackend", "StepOptions", "build_backend"]
