"""Fixed batches of a Trainer's training set for BatchNorm recalibration.

The CLI's batches (``sparse_sup.recalibration``'s plan: the pooled statistics, and S_i, do not depend
on the number of processes), taken through the Trainer's own column removal and data collator."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..core.collectives import Collectives
from ..recalibration import recalibration_plan
from ..tickets import Discard


def _collated(trainer, dataset):
    """(dataset, collate_fn) as the Trainer's own dataloaders see them."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return trainer._remove_unused_columns(dataset, description="BN recalibration"), trainer.data_collator
    return dataset, trainer._get_collator_with_removed_columns(trainer.data_collator, "BN recalibration")


def recalibration_batches(
    trainer,
    *,
    batch_size: int,
    num_batches: int | None,
    seed: int,
    counter: int,
    collectives: Collectives,
    lockstep: bool,
) -> Iterator[dict | Discard]:
    """Model inputs (labels dropped, on the Trainer's device) of recalibration pass ``counter``.
    With ``lockstep`` (collective forwards) every rank yields the same number of items."""
    dataset, collate = _collated(trainer, trainer.train_dataset)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise ValueError(
            "BN recalibration needs a map-style train_dataset; set tickets_bn_recalibration=False"
        )
    if batch_size > len(dataset):
        raise ValueError(
            f"BN recalibration batch size {batch_size} exceeds the {len(dataset)} training examples; "
            "lower tickets_bn_recal_batch_size"
        )
    plan = recalibration_plan(
        len(dataset),
        batch_size,
        num_batches,
        seed=seed,
        counter=counter,
        collectives=collectives,
        lockstep=lockstep,
    )
    labels = set(trainer.label_names)
    for indices, discard in plan.rounds:
        batch = collate([dataset[k] for k in indices])
        inputs = {k: v for k, v in trainer._prepare_inputs(batch).items() if k not in labels}
        yield Discard(inputs) if discard else inputs
