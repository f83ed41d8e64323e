"""Hand the model to the engine the launcher chose, once; everything after reads the engine from
the prepared model's type (``build_backend``)."""

from __future__ import annotations

import torch

from ..backends.detect import accelerate_shards_model, detect_parallelism
from ..backends.fsdp2 import check_fsdp2_mixed_precision, fsdp2_shard_model
from .optim import build_optimizer
from .setup import Prepared


def wrap_model(prepared: Prepared, accelerator) -> tuple[torch.nn.Module, object]:
    """(prepared model, optimizer): a ``DeepSpeedEngine`` under the deepspeed launcher or
    Accelerate's DeepSpeed plugin, a ``fully_shard``-ed module for FSDP2, else Accelerate's DDP /
    single-process wrap (optionally ``torch.compile``-d)."""
    c, model = prepared.config, prepared.model
    if prepared.deepspeed_config is not None:  # the deepspeed launcher: DeepSpeed wraps the model
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, c.optim), config=prepared.deepspeed_config
        )
        return engine, optimizer
    if detect_parallelism(accelerator) == "fsdp2":
        if not accelerate_shards_model(accelerator):
            fsdp2_shard_model(model)  # Accelerate ignores its FSDP plugin on CPU: shard here
            return model, accelerator.prepare(build_optimizer(model, c.optim))  # params are DTensors now
        check_fsdp2_mixed_precision(model, accelerator.mixed_precision)
    if c.train.compile:
        model = torch.compile(model)
    return accelerator.prepare(model, build_optimizer(model, c.optim))
