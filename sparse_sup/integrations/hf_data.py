"""Fixed batches of a Trainer's training set for BatchNorm recalibration.

As in the CLI: batch j holds a fixed slice of an order seeded by (seed, recalibration pass) and goes
to rank j mod W, so the pooled statistics (and S_i) do not depend on the number of processes. The
examples are taken through the Trainer's own column removal and data collator."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..core.collectives import Collectives
from ..data.keys import mix32, recalibration_epoch
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
    epoch = recalibration_epoch(counter)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(mix32(seed, epoch)))
    total = len(dataset) // batch_size
    if num_batches is not None:
        total = min(total, num_batches)
    if total == 0:
        raise ValueError(
            f"BN recalibration batch size {batch_size} exceeds the {len(dataset)} training examples; "
            "lower tickets_bn_recal_batch_size"
        )
    world, rank = collectives.world_size, collectives.rank
    mine = list(range(rank, total, world))
    rounds = -(-total // world) if lockstep else len(mine)
    labels = set(trainer.label_names)
    for i in range(rounds):
        j = mine[i] if i < len(mine) else 0
        batch = collate([dataset[int(k)] for k in order[j * batch_size : (j + 1) * batch_size]])
        inputs = {k: v for k, v in trainer._prepare_inputs(batch).items() if k not in labels}
        yield inputs if i < len(mine) else Discard(inputs)
