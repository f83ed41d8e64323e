"""Hand the model to the engine the launcher chose, once; everything after reads the engine from
the prepared model's type (``build_backend``)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..backends.detect import detect_parallelism
from ..backends.fsdp2 import fsdp2_describe, fsdp2_shard_model
from ..config import Config, ConfigError
from .optim import build_optimizer
from .setup import Prepared

log = logging.getLogger(__name__)
SGD_NAMES = ("sgd", "momentum", "nesterov")  # the optimizer names that build torch.optim.SGD
LOW_PRECISION = {"bf16": torch.bfloat16}  # FSDP2 computes in these through its MixedPrecisionPolicy


def check_wrap_options(config: Config, parallelism: str, world_size: int = 1) -> None:
    """Refuse what the chosen engine cannot do with ``train.compile`` / ``train.channels_last`` /
    ``train.dp_replicate``, before anything is written (``ConfigError``, exit 2)."""
    c = config.train
    if c.dp_replicate > 1 and parallelism != "fsdp2":
        raise ConfigError(
            f"train.dp_replicate={c.dp_replicate} (HSDP) under {parallelism}: it shapes FSDP2's device "
            "mesh. Launch with FSDP2 (launch/accelerate/fsdp2-*.yaml), or leave train.dp_replicate=1"
        )
    if world_size % c.dp_replicate:
        raise ConfigError(
            f"train.dp_replicate={c.dp_replicate} does not divide the {world_size} processes: HSDP's mesh is "
            f"(dp_replicate, processes / dp_replicate); use a divisor of {world_size} (the processes per "
            "node is the usual shard group)"
        )
    if c.compile and parallelism == "deepspeed":
        raise ConfigError(
            "train.compile=true under DeepSpeed: the DeepSpeedEngine wraps the model and runs the "
            "sparse step inside backward; sparse_sup does not compile it (DeepSpeed's own "
            "engine.compile() is untested with masks). Use train.compile=false, or DDP/FSDP2"
        )
    if parallelism == "fsdp2" and config.optim.fused and config.optim.name.lower() in SGD_NAMES:
        raise ConfigError(
            f"optim.fused=true with {config.optim.name} under FSDP2: torch has no fused SGD kernel for "
            "sharded (DTensor) parameters. Use optim.fused=null (foreach SGD), or fused adamw"
        )
    if c.channels_last and parallelism in ("deepspeed", "fsdp2"):
        raise ConfigError(
            f"train.channels_last=true under {parallelism}: sharded engines flatten parameters in "
            "row-major order and need contiguous weights. Use channels_last with one process or DDP"
        )


def fsdp2_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """The optimizer over DTensor parameters. torch has no DTensor kernel for fused SGD
    (``aten._fused_sgd_``: "no sharding strategy registered"; fused Adam/AdamW have one): where
    ``optim.fused`` was left to its default, SGD runs foreach; asked for explicitly, refused."""
    optimizer = build_optimizer(model, config.optim)
    if isinstance(optimizer, torch.optim.SGD) and optimizer.defaults.get("fused"):
        optimizer = build_optimizer(model, dataclasses.replace(config.optim, fused=False))
    return optimizer


def hsdp_mesh(replicas: int, world_size: int):
    """The 2-D (replicate, shard) device mesh of HSDP, or None (plain FSDP over every rank)."""
    if replicas == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))


def wrap_model(prepared: Prepared, accelerator) -> tuple[torch.nn.Module, object]:
    """(prepared model, optimizer): a ``DeepSpeedEngine`` under the deepspeed launcher or
    Accelerate's DeepSpeed plugin; for FSDP2 the model sharded here per block (CPU and GPUs alike),
    BatchNorm in float32 units under bf16, blocks compiled before sharding (``train.compile``);
    else Accelerate's DDP / single-process wrap, then ``torch.compile`` of the wrapped model."""
    c, model = prepared.config, prepared.model
    parallelism = "deepspeed" if prepared.deepspeed_config is not None else detect_parallelism(accelerator)
    check_wrap_options(c, parallelism, accelerator.num_processes)
    if prepared.deepspeed_config is not None:  # the deepspeed launcher: DeepSpeed wraps the model
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, c.optim), config=prepared.deepspeed_config
        )
        return engine, optimizer
    if c.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        log.info("channels_last: weights and input batches")
    if parallelism == "fsdp2":
        if torch.cuda.is_available():
            model = model.to(accelerator.device)
        param_dtype = LOW_PRECISION.get(c.train.precision)
        mesh = hsdp_mesh(c.train.dp_replicate, accelerator.num_processes)
        fsdp2_shard_model(model, mesh=mesh, param_dtype=param_dtype, compile_blocks=c.train.compile)
        log.info("FSDP2: %s%s", fsdp2_describe(model), "" if mesh is None else f", HSDP mesh {mesh}")
        # the optimizer over the DTensor parameters; not handed to Accelerate: on GPUs its FSDP2
        # prepare() wants the model too and would shard it again with its own policy
        return model, fsdp2_optimizer(model, c)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, c.optim))
    if c.train.compile:  # after DDP's wrap (its bucketing splits the graph), the usual order
        model = torch.compile(model)
        log.info("torch.compile: the %s model", "DDP-wrapped" if hasattr(model, "no_sync") else "whole")
    return model, optimizer
