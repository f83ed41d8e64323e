"""tickets.schedule: the paper's cycles against the tail schedules, which take no steps from phase 1's
LR schedule: ``tail`` snapshots its last part, ``tail_cycles`` replaces it by the paper's cycles."""

from __future__ import annotations

import pytest

from sparse_sup.config import load_config, resolve_plan
from sparse_sup.config.errors import ConfigError
from sparse_sup.timeline import Timeline

BASE = ["--schedule.epochs=10", "--schedule.batch_size=16", "--sparse.update_interval=10"]


def _timeline(*overrides: str) -> Timeline:
    cfg = load_config(None, [*BASE, *overrides])
    return Timeline.from_config(cfg, resolve_plan(cfg, 160))  # 10 steps per epoch, 100 steps


@pytest.mark.parametrize("lr_schedule", ["step", "cosine"])
def test_tail_keeps_the_base_runs_lr_at_every_step(lr_schedule: str) -> None:
    """The tail's tickets are snapshots of the base schedule: its LR equals the base run's at every
    step, while the paper's cycles compress phase 1 and run their own triangle."""
    flags = [f"--schedule.lr_schedule={lr_schedule}", "--tickets.cycles_fraction=0.3"]
    base = _timeline(*flags, "--tickets.num_cycles=0")
    tail = _timeline(*flags, "--tickets.num_cycles=3", "--tickets.schedule=tail")
    cycles = _timeline(*flags, "--tickets.num_cycles=3")
    assert tail.plan.pre_steps == cycles.plan.pre_steps == 70
    assert [tail.lr(s) for s in range(100)] == [base.lr(s) for s in range(100)]
    assert [cycles.lr(s) for s in range(70)] != [base.lr(s) for s in range(70)]
    assert max(cycles.lr(s) for s in range(70, 100)) == pytest.approx(cycles.tickets.lr_high)
    if lr_schedule == "step":
        assert tail.plan.lr_milestones == (50, 75) and cycles.plan.lr_milestones == (35, 52)


def test_tail_does_not_reexplore_by_default_and_freezes_masks() -> None:
    tail = _timeline("--tickets.num_cycles=3", "--tickets.schedule=tail", "--tickets.cycles_fraction=0.3")
    events = {s: tail.mask_events(s) for s in range(1, 101)}
    assert tail.tickets.reexplore_fraction == 0.0
    assert all("reexplore" not in e for e in events.values())
    assert [s for s, e in events.items() if "update" in e] == [10, 20, 30, 40, 50, 60]
    cycles = _timeline("--tickets.num_cycles=3", "--tickets.cycles_fraction=0.3")
    assert cycles.tickets.reexplore_fraction == 0.5
    assert [s for s in range(1, 101) if "reexplore" in cycles.mask_events(s)] == [70, 80, 90]
    explicit = _timeline("--tickets.schedule=tail", "--tickets.reexplore_fraction=0.2")
    assert explicit.tickets.reexplore_fraction == 0.2


def test_unknown_ticket_schedule_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"tickets\.schedule.*swa.*cycles.*tail"):
        load_config(None, ["--tickets.schedule=swa"])


def test_the_run_says_where_its_tickets_came_from() -> None:
    from sparse_sup.results import describe_tickets

    tail = _timeline("--tickets.num_cycles=3", "--tickets.schedule=tail", "--tickets.cycles_fraction=0.3")
    assert "base LR schedule over all of them; 3 tickets every 10 steps from step 70" in tail.plan.describe()
    assert "3 cycles x 10 steps" in _timeline("--tickets.cycles_fraction=0.3").plan.describe()
    plan = {"num_cycles": 3, "cycles_fraction": 0.3}
    assert (
        describe_tickets({**plan, "ticket_schedule": "tail"})
        == "3 tickets from the last 30% of the base schedule (tail)"
    )
    assert (
        describe_tickets({**plan, "ticket_schedule": "cycles"}) == "3 tickets (30% of the budget in cycles)"
    )


def test_tail_cycles_is_the_base_run_until_its_cycles_then_the_papers_triangle() -> None:
    """Phase 1 of tail_cycles runs the base run's LR at every step (its milestones are the base run's,
    not compressed into phase 1); each cycle runs the same triangle as the paper's cycles."""
    flags = ["--tickets.cycles_fraction=0.3", "--tickets.num_cycles=3"]
    base = _timeline("--tickets.num_cycles=0")
    late = _timeline(*flags, "--tickets.schedule=tail_cycles")
    cycles = _timeline(*flags)
    assert late.plan.pre_steps == 70 and late.plan.lr_milestones == base.plan.lr_milestones == (50, 75)
    assert [late.lr(s) for s in range(70)] == [base.lr(s) for s in range(70)]
    assert [late.lr(s) for s in range(70, 100)] == [cycles.lr(s) for s in range(70, 100)]
    assert late.tickets.reexplore_fraction == 0.0
    events = {s: late.mask_events(s) for s in range(1, 101)}
    assert [s for s, e in events.items() if "update" in e] == [10, 20, 30, 40, 50, 60]
    assert all("reexplore" not in e for e in events.values())


def test_tail_cycles_equals_the_papers_cycles_with_the_base_runs_milestones() -> None:
    """What the schedule study ran before the name existed (docs/RESULTS.md): the paper's cycles with
    milestone fractions of phase 1 that land on the base run's milestone steps. The same LR at every
    step, the same mask events."""
    flags = ["--tickets.cycles_fraction=0.15", "--tickets.num_cycles=3", "--tickets.reexplore_fraction=0"]
    late = _timeline(*flags, "--tickets.schedule=tail_cycles")
    study = _timeline(*flags, "--tickets.schedule=cycles", "--schedule.lr_milestones=[0.5882, 0.8824]")
    assert late.plan.pre_steps == study.plan.pre_steps == 85
    assert late.plan.lr_milestones == study.plan.lr_milestones == (50, 75)
    assert [late.lr(s) for s in range(100)] == [study.lr(s) for s in range(100)]
    assert [late.mask_events(s) for s in range(1, 101)] == [study.mask_events(s) for s in range(1, 101)]


def test_tail_cycles_says_what_it_does() -> None:
    from sparse_sup.results import describe_tickets

    late = _timeline(
        "--tickets.num_cycles=3", "--tickets.schedule=tail_cycles", "--tickets.cycles_fraction=0.3"
    )
    assert (
        "phase 1 70 steps (70%) on the base LR schedule of all 100 steps, 3 cycles x 10 steps"
        in late.plan.describe()
    )
    assert (
        describe_tickets({"num_cycles": 3, "cycles_fraction": 0.3, "ticket_schedule": "tail_cycles"})
        == "3 tickets (30% of the budget in cycles, after the base run's own LR schedule (tail_cycles))"
    )
