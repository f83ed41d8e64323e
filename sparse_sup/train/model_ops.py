"""Evaluation and BN recalibration of whatever the backend's model holds now (a ticket, S_i, the
final model): the one implementation the training loop and ``merge`` share."""

from __future__ import annotations

import torch

from ..backends.buffers import sync_buffers
from ..tickets import recalibrate_batchnorm
from .evaluate import evaluate, recalibration_batches
from .setup import Prepared
from .step import forward_autocast


def model_device(backend) -> torch.device:
    return next(backend.module.parameters()).device


def evaluate_model(backend, prepared: Prepared, module: torch.nn.Module | None = None) -> dict[str, float]:
    """Accuracy and loss over the eval split, each example counted once (collective), of the
    backend's model or of ``module``, a whole replicated one evaluated alike (the EMA)."""
    d, own = prepared.config.data, module is None
    module = backend.module if own else module
    sync_buffers(module, backend.data_parallel)  # BN buffers equal on all ranks first
    with forward_autocast(prepared.config.train.precision, backend)():
        return evaluate(
            module,
            prepared.eval_set,
            d.eval_batch_size,
            backend.data_parallel,
            next(module.parameters()).device,
            d.num_workers,
            lockstep=backend.lockstep and own,  # a sharded model's forwards are collective
        )


def recalibrate_model_bn(backend, prepared: Prepared, counter: int) -> None:
    """Pooled BN statistics over recalibration pass ``counter`` (collective)."""
    c = prepared.config
    batches = recalibration_batches(
        prepared.bn_set,
        c.data.eval_batch_size,
        c.tickets.bn_recal_batches,
        c.experiment.seed,
        backend.data_parallel,
        model_device(backend),
        next(backend.module.parameters()).dtype,
        lockstep=backend.lockstep,
        counter=counter,
        num_workers=c.data.num_workers,
    )
    with forward_autocast(c.train.precision, backend)():  # the statistics of training's numerics
        recalibrate_batchnorm(backend.module, batches, backend.data_parallel)
