"""BatchNorm recalibration with exact pooled statistics.

The reference code resets running stats and averages per-batch statistics on one process. Here
each BN layer's input is summed (per channel: sum, sum of squares, count, in float64, from each
batch's mean and variance as the BN layer computed them) over all batches and all data-parallel
ranks, then running_mean/var are set to the pooled mean and unbiased variance. With batches that
do not depend on the world size, the result does not either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.collectives import LOCAL, Collectives

log = logging.getLogger(__name__)


class Discard(NamedTuple):
    """A batch to run forward without counting it: keeps ranks in lockstep when the forward is
    collective (FSDP2 all-gathers) and one rank has fewer real batches than another."""

    input: torch.Tensor


@torch.no_grad()
def recalibrate_batchnorm(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor | Discard],
    collectives: Collectives = LOCAL,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> int:
    """Recompute every BN layer's running statistics from ``batches`` (inputs only).

    ``Discard`` batches run forward but are not counted. Collective: one all-reduce over ``collectives``.
    Returns the number of BN layers recalibrated (0: the model has none, nothing is done).
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        log.info("model has no BatchNorm layers: skipping BN recalibration")
        return 0
    forward = forward or model
    # per layer: [sum over channel (c), sum of squares (c), values per channel (1)], float64
    totals = {
        m: torch.zeros(2 * m.num_features + 1, dtype=torch.float64, device=m.running_mean.device)
        for m in layers
    }

    counting = [True]

    def hook(module: _BatchNorm, args: tuple, output: object) -> None:
        """After the layer's forward: with momentum 1 its running stats are this batch's mean and
        unbiased variance, computed by the BN kernel itself (a second pass over the input cost
        more than the BN); pooled in float64 as sum and sum of squares."""
        if not counting[0]:
            return
        n = args[0].numel() / args[0].shape[1]
        mean = module.running_mean.to(torch.float64)
        var = module.running_var.to(torch.float64) * ((n - 1) / n)  # biased: this batch's own
        totals[module] += torch.cat([mean * n, (var + mean * mean) * n, mean.new_tensor([n])])

    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()  # (1 - momentum) * old is computed: no inf/NaN left in the old stats
        m.momentum = 1.0
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    model.train()
    num_batches = 0
    try:
        for batch in batches:
            counting[0] = not isinstance(batch, Discard)
            forward(batch.input if isinstance(batch, Discard) else batch)
            num_batches += counting[0]
    finally:
        for h in handles:
            h.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    flat = torch.cat([totals[m] for m in layers] + [totals[layers[0]].new_tensor([float(num_batches)])])
    collectives.all_reduce_sum(flat)
    batches_total = int(flat[-1])
    offset = 0
    for m in layers:
        c = m.num_features
        s, ss, n = flat[offset : offset + c], flat[offset + c : offset + 2 * c], flat[offset + 2 * c]
        offset += 2 * c + 1
        if n < 2:
            raise ValueError(f"BN recalibration saw {int(n)} values per channel; give it more data")
        mean = s / n
        var = (ss / n - mean * mean).clamp(min=0) * (n / (n - 1))
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(batches_total)
    return len(layers)
