"""One BN-recalibration plan for every front end (``sparse_sup.recalibration``): batch j of a seeded
order goes to rank j mod W, so S_i's pooled statistics do not depend on the world size; the CLI's
batches (``train.evaluate``) and the Trainer's (``integrations.hf_data``) are exactly its samples."""

from __future__ import annotations

import pytest
import torch

from sparse_sup.recalibration import recalibration_plan
from sparse_sup.tickets import Discard


class RankOf:
    """The ``Collectives`` view of one rank among ``world_size`` (only world_size/rank are read)."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank


@pytest.mark.parametrize("lockstep", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_batch_once_whatever_the_world_size(world, lockstep):
    one = recalibration_plan(50, 8, 5, seed=3, counter=1, collectives=RankOf(1, 0), lockstep=False)
    assert len(one.rounds) == 5 and not any(discard for _, discard in one.rounds)
    by_batch, counts = {}, []
    for rank in range(world):
        plan = recalibration_plan(
            50, 8, 5, seed=3, counter=1, collectives=RankOf(world, rank), lockstep=lockstep
        )
        assert plan.epoch == one.epoch
        counts.append(len(plan.rounds))
        real = [indices for indices, discard in plan.rounds if not discard]
        for i, indices in enumerate(real):
            by_batch[rank + i * world] = indices
    assert [by_batch[j] for j in range(5)] == [indices for indices, _ in one.rounds]
    if lockstep:
        assert len(set(counts)) == 1


def test_each_pass_draws_its_own_order():
    a = recalibration_plan(64, 8, None, seed=0, counter=0, collectives=RankOf(1, 0), lockstep=False)
    b = recalibration_plan(64, 8, None, seed=0, counter=1, collectives=RankOf(1, 0), lockstep=False)
    assert a.epoch != b.epoch and a.rounds != b.rounds
    assert sorted(i for indices, _ in a.rounds for i in indices) == list(range(64))


class Indexed(torch.utils.data.Dataset):
    """Sample i is the number i: batches say which samples they hold."""

    in_memory = True  # the CLI's in-memory dataset: ``make_loader`` serves it by ``get_batch``

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": torch.tensor([float(i)]), "labels": torch.tensor(i)}

    def get_batch(self, keys):  # the CLI's in-memory dataset interface: keys (epoch, index)
        return torch.tensor([[float(i)] for _, i in keys]), torch.tensor([i for _, i in keys])


@pytest.mark.parametrize("world, rank", [(1, 0), (3, 2)])
def test_cli_and_trainer_recalibrate_on_the_plans_samples(tmp_path, world, rank):
    from transformers import Trainer, TrainingArguments

    from sparse_sup.integrations.hf_data import recalibration_batches as trainer_batches
    from sparse_sup.train.evaluate import recalibration_batches as cli_batches

    plan = recalibration_plan(40, 6, None, seed=5, counter=2, collectives=RankOf(world, rank), lockstep=True)
    want = [(indices, discard) for indices, discard in plan.rounds]

    def seen(items):
        out = []
        for x in items:
            data = x.input if isinstance(x, Discard) else x
            data = data["pixel_values"] if isinstance(data, dict) else data
            out.append(([int(v) for v in data.reshape(-1)], isinstance(x, Discard)))
        return out

    cli = cli_batches(Indexed(), 6, None, 5, RankOf(world, rank), torch.device("cpu"), torch.float32, True, 2)
    assert seen(cli) == want
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False
    )
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=Indexed())
    hf = trainer_batches(
        trainer,
        batch_size=6,
        num_batches=None,
        seed=5,
        counter=2,
        collectives=RankOf(world, rank),
        lockstep=True,
    )
    assert seen(hf) == want
