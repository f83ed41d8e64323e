"""Turn epoch-based settings into optimizer-step counts, once, when the data size is known."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .schema import TICKET_SCHEDULES, Config, ScheduleConfig


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """Every schedule position in optimizer steps. Phase 1 is [0, pre_steps); cycle m is
    [pre_steps + m * cycle_steps, pre_steps + (m + 1) * cycle_steps)."""

    steps_per_epoch: int
    total_steps: int
    num_cycles: int
    cycle_steps: int
    warmup_steps: int
    lr_milestones: tuple[int, ...]
    prune_start: int
    prune_end: int
    # steps the base LR schedule (step milestones, cosine) spans: phase 1 with the paper's cycles,
    # the whole budget with tickets.schedule=tail or tail_cycles; None: pre_steps
    base_lr_steps: int | None = None
    ticket_schedule: str = "cycles"  # a key of TICKET_SCHEDULES

    @property
    def pre_steps(self) -> int:
        return self.total_steps - self.num_cycles * self.cycle_steps

    @property
    def cycles_fraction(self) -> float:
        return self.num_cycles * self.cycle_steps / self.total_steps

    def describe(self) -> str:
        spec = TICKET_SCHEDULES[self.ticket_schedule]
        if self.num_cycles and not spec.cyclic_lr:  # tickets.schedule=tail
            return (
                f"{self.total_steps} steps ({self.steps_per_epoch}/epoch), the base LR schedule over all of "
                f"them; {self.num_cycles} tickets every {self.cycle_steps} steps from step {self.pre_steps} "
                f"(the last {100 * self.cycles_fraction:.0f}%, no step leaves phase 1's schedule)"
            )
        lr_span = (
            f" on the base LR schedule of all {self.total_steps} steps"
            if self.num_cycles and spec.base_lr_over_whole_budget
            else ""
        )
        return (
            f"{self.total_steps} steps ({self.steps_per_epoch}/epoch): phase 1 {self.pre_steps} steps "
            f"({100 * (1 - self.cycles_fraction):.0f}%){lr_span}, {self.num_cycles} cycles x "
            f"{self.cycle_steps} steps ({100 * self.cycles_fraction:.0f}% of the budget)"
        )


def check_batch_split(schedule: ScheduleConfig, world_size: int) -> None:
    """The global batch must split into ``world_size * grad_accum_steps`` equal micro-batches."""
    parts = world_size * schedule.grad_accum_steps
    if schedule.batch_size % parts:
        raise ConfigError(
            f"schedule.batch_size={schedule.batch_size} does not split over {world_size} process(es) x "
            f"schedule.grad_accum_steps={schedule.grad_accum_steps}: use a batch size that is a multiple "
            f"of {parts}, or change schedule.grad_accum_steps"
        )


@dataclass(frozen=True, kw_only=True)
class PlanKeys:
    """How a front end names the settings behind a plan, for its error messages."""

    num_cycles: str = "tickets.num_cycles"
    cycle_length: str = "tickets.cycle_epochs / tickets.cycles_fraction"
    budget: str = "schedule.epochs"


def plan_steps(
    *,
    total_steps: int,
    steps_per_epoch: int,
    num_cycles: int,
    cycle_steps: int | None,
    cycles_fraction: float | None,
    warmup_steps: int = 0,
    lr_milestones: tuple[float, ...] = (),
    prune_start: int = 0,
    prune_end: int | None = None,
    ticket_schedule: str = "cycles",
    keys: PlanKeys = PlanKeys(),
    budget: str | None = None,
) -> StepPlan:
    """The phase plan over ``total_steps`` optimizer steps, for every front end (the CLI through
    ``resolve_plan``, the Trainer through ``SparsityArguments.plan``). ``cycle_steps``: explicit cycle
    length, else ``cycles_fraction`` of the budget (default 0.1) split over the cycles;
    ``lr_milestones``: fractions of the base LR schedule's span (phase 1, or the whole budget where
    ``ticket_schedule``'s spec says so); ``prune_end`` None: the end of phase 1. ``budget``
    describes the budget in messages (default ``keys.budget``). Raises ``ConfigError`` naming the
    keys when the budget cannot hold the requested phases."""
    n = num_cycles
    if n == 0:
        cycle_steps = 0
    elif cycle_steps is None:
        fraction = 0.1 if cycles_fraction is None else cycles_fraction
        cycle_steps = round(fraction * total_steps / n)
    if n and cycle_steps < 2:
        raise ConfigError(
            f"{keys.num_cycles}={n} gives cycles of {cycle_steps} optimizer steps, too short (need >= 2); "
            f"use fewer cycles or raise {keys.cycle_length} or {keys.budget}"
        )
    if n * cycle_steps >= total_steps:
        raise ConfigError(
            f"{keys.num_cycles}={n} x {cycle_steps} steps per cycle do not fit in {budget or keys.budget} "
            f"({total_steps} steps): phase 1 would have no steps; use fewer or shorter cycles, or raise "
            f"{keys.budget}"
        )
    pre = total_steps - n * cycle_steps
    lr_span = total_steps if TICKET_SCHEDULES[ticket_schedule].base_lr_over_whole_budget else pre
    end = pre if prune_end is None else min(pre, prune_end)
    return StepPlan(
        steps_per_epoch=max(1, steps_per_epoch),
        total_steps=total_steps,
        num_cycles=n,
        cycle_steps=cycle_steps,
        warmup_steps=warmup_steps,
        lr_milestones=tuple(round(m * lr_span) for m in lr_milestones),
        # a start after the end prunes nothing either way (GraNet prunes in [start, phase 1's end))
        prune_start=min(prune_start, end),
        prune_end=end,
        base_lr_steps=lr_span,
        ticket_schedule=ticket_schedule,
    )


def resolve_plan(config: Config, num_train_samples: int) -> StepPlan:
    """The CLI's plan: epoch-based settings in optimizer steps of ``schedule.batch_size`` over
    ``num_train_samples`` examples, then ``plan_steps``."""
    batch = config.schedule.batch_size
    steps_per_epoch = num_train_samples // batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"schedule.batch_size={batch} is larger than the training set ({num_train_samples} samples)"
        )
    t, s = config.tickets, config.sparse
    return plan_steps(
        total_steps=round(config.schedule.epochs * steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        num_cycles=t.num_cycles,
        cycle_steps=None if t.cycle_epochs is None else round(t.cycle_epochs * steps_per_epoch),
        cycles_fraction=t.cycles_fraction,
        warmup_steps=round(config.schedule.warmup_epochs * steps_per_epoch),
        lr_milestones=tuple(config.schedule.lr_milestones),
        prune_start=round(s.granet_prune_start_epoch * steps_per_epoch),
        prune_end=round(s.granet_prune_end_epoch * steps_per_epoch),
        ticket_schedule=t.schedule,
        budget=f"schedule.epochs={config.schedule.epochs}",
    )
