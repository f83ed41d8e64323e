"""Distributed evaluation that counts every example exactly once.

Rank r evaluates examples r, r+W, r+2W, ... (no sampler padding, no duplicates); sums of correct
predictions, loss and count are all-reduced over the data-parallel group. With ``lockstep``
(sharded engines whose forward is collective), ranks with fewer batches run extra forwards whose
results are discarded, so every rank issues the same number of forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.collectives import Collectives
from ..data import EvalShardSampler, make_loader
from ..progress import progress


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    batch_size: int,
    collectives: Collectives,
    device: torch.device,
    num_workers: int = 0,
    lockstep: bool = False,
) -> dict[str, float]:
    world, rank = collectives.world_size, collectives.rank
    sampler = EvalShardSampler(len(dataset), batch_size, world, rank)
    was_training = model.training
    model.eval()
    # correct, summed loss, count: summed on the device, read once at the end (no sync per batch)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    dtype = next(model.parameters()).dtype
    last = None
    batches = make_loader(dataset, sampler, num_workers)
    for images, labels in progress(batches, total=len(sampler), desc="evaluate", unit="batch"):
        images, labels = images.to(device, dtype), labels.to(device)
        logits = model(images).float()
        totals[0] += (logits.argmax(1) == labels).sum()
        totals[1] += F.cross_entropy(logits, labels, reduction="sum").double()
        totals[2] += labels.numel()
        last = images
    if lockstep:
        most = max(len(EvalShardSampler(len(dataset), batch_size, world, r)) for r in range(world))
        for _ in range(most - len(sampler)):
            model(last if last is not None else dataset.get_batch([(0, 0)])[0].to(device, dtype))
    collectives.all_reduce_sum(totals)
    model.train(was_training)
    correct, loss, count = totals.tolist()
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "count": int(count)}


def recalibration_batches(
    dataset,
    batch_size: int,
    num_batches: int | None,
    seed: int,
    collectives: Collectives,
    device: torch.device,
    dtype: torch.dtype,
    lockstep: bool = False,
    counter: int = 0,
    num_workers: int = 0,
):
    """Training images for BN recalibration pass ``counter``, the batches of ``recalibration_plan``
    (their content does not depend on the world size).

    Sample ``i`` is served with the key ``(recalibration_epoch(counter), i)``: through the training
    transform (``dataset.train``) it gets augmentations of its own, a pure function of
    (seed, counter, i). The order is seeded by (seed, counter) as a training epoch's is.
    With ``lockstep`` every rank yields the same number of items (``Discard``: forward only).
    Decoded by ``num_workers`` DataLoader workers where the dataset decodes per sample."""
    from ..recalibration import recalibration_plan
    from ..tickets import Discard

    plan = recalibration_plan(
        len(dataset),
        batch_size,
        num_batches,
        seed=seed,
        counter=counter,
        collectives=collectives,
        lockstep=lockstep,
    )
    keys = [[(plan.epoch, k) for k in indices] for indices, _ in plan.rounds]
    batches = make_loader(dataset, keys, num_workers)
    rounds = progress(
        zip(batches, plan.rounds, strict=True), total=len(keys), desc="BN recalibration", unit="batch"
    )
    for (images, _), (_, discard) in rounds:
        images = images.to(device, dtype)
        yield Discard(images) if discard else images
