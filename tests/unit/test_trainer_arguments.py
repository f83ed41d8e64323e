"""``SparsityArguments`` (the Trainer's sparse settings) read the shared pieces: the phase plan is
``config.plan.plan_steps``, the CLI's arithmetic and messages, and ``sparse_method`` is checked
against the DST-method registry. Plain Python: no transformers import."""

from __future__ import annotations

import pytest

from sparse_sup.config import load_config, resolve_plan
from sparse_sup.integrations.arguments import SparsityArguments
from sparse_sup.methods import METHODS, DSTMethod, register_method


@pytest.mark.parametrize("schedule", ["cycles", "tail", "tail_cycles"])
@pytest.mark.parametrize(
    "cycles, cycle_steps, fraction",
    [(3, None, None), (2, 5, None), (4, None, 0.25), (0, None, None)],
)
def test_trainer_plan_equals_the_cli_plan(cycles, cycle_steps, fraction, schedule) -> None:
    """Same budget (100 samples / batch 5 x 3 epochs = 60 steps), same tickets: the same plan."""
    args = ["--schedule.epochs=3", "--schedule.batch_size=5", f"--tickets.num_cycles={cycles}"]
    args += [f"--tickets.schedule={schedule}"]
    args += [f"--tickets.cycle_epochs={cycle_steps / 20}"] if cycle_steps else []
    args += [f"--tickets.cycles_fraction={fraction}"] if fraction else []
    args += ["--schedule.warmup_epochs=0", "--schedule.lr_milestones=[]", "--sparse.granet_prune_end_epoch=3"]
    cli = resolve_plan(load_config(None, args), 100)
    sparsity = SparsityArguments(
        tickets_num_cycles=cycles,
        tickets_cycle_steps=cycle_steps,
        tickets_cycles_fraction=fraction,
        tickets_schedule=schedule,
    )
    assert sparsity.plan(60, 20) == cli
    # the CLI's resolution of the re-exploration default (0.5 with cycles, 0 in the tail)
    ours, cli_tickets = sparsity.tickets_config(), load_config(None, args).tickets
    assert (ours.schedule, ours.reexplore_fraction) == (cli_tickets.schedule, cli_tickets.reexplore_fraction)


def test_trainer_plan_errors_name_the_trainer_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"tickets_num_cycles=3 x 10 steps per cycle do not fit .*\(30 steps\)"
    ):
        SparsityArguments(tickets_num_cycles=3, tickets_cycle_steps=10).plan(30, 10)
    with pytest.raises(
        ValueError, match=r"tickets_num_cycles=3 gives cycles of 1 optimizer steps, too short"
    ):
        SparsityArguments(tickets_num_cycles=3).plan(30, 10)


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(
        ValueError, match=r"sparse_method='nope' is invalid: allowed values are 'granet'.*'rigl'.*'set'"
    ):
        SparsityArguments(sparse_method="nope")


def test_a_newly_registered_method_is_accepted_without_editing_the_arguments() -> None:
    @register_method
    class TrainerOnlySET(DSTMethod):
        name = "trainer-test-set"
        grow = "random"

    try:
        sa = SparsityArguments(sparse_method="trainer-test-set")
        assert sa.sparse_config().method == "trainer-test-set"
    finally:
        del METHODS[TrainerOnlySET.name]
