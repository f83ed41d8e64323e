"""A Sup-tickets run's schedules as pure functions of the optimizer-step count (timm's schedulers
are functions of the step too): phase and cycle, group 0's LR (the base schedule with warm-up in
phase 1, the triangle in every cycle), the mask events due after a step and how each changes the masks.
``step`` is always the number of optimizer steps completed before the one in question."""

from __future__ import annotations

from .core import schedules
from .methods import create_method


class Timeline:
    def __init__(self, *, plan, sparse, tickets, schedule, base_lr: float, method) -> None:
        """``plan``: the run's ``StepPlan``; ``sparse``/``tickets``/``schedule``: its config sections;
        ``method``: the DST method (its global prune schedule decides 'prune' events)."""
        self.plan, self.sparse, self.tickets, self.schedule = plan, sparse, tickets, schedule
        self.base_lr, self.method = base_lr, method
        self.phases = schedules.PhasePlan(
            total_steps=plan.total_steps, num_cycles=plan.num_cycles, cycle_steps=plan.cycle_steps
        )

    @classmethod
    def from_config(cls, config, plan) -> Timeline:
        """The timeline a run's ``Config`` and its ``StepPlan`` describe, with the config's DST method."""
        return cls(
            plan=plan,
            sparse=config.sparse,
            tickets=config.tickets,
            schedule=config.schedule,
            base_lr=config.optim.lr,
            method=create_method(config.sparse, plan),
        )

    def triangle_cycle(self, step: int) -> int | None:
        """The cycle whose triangle sets the LR of the step after ``step``; None where the base
        schedule sets it (phase 1, and the whole budget with ``tickets.schedule=tail``)."""
        return self.phases.cycle_of(step) if self.tickets.schedule_spec.cyclic_lr else None

    def lr(self, step: int) -> float:
        """Group 0's LR for the optimizer step taken after ``step`` completed steps."""
        cycle = self.triangle_cycle(step)
        if cycle is not None:
            within = min(
                step - self.plan.pre_steps - cycle * self.plan.cycle_steps, self.plan.cycle_steps - 1
            )
            return schedules.triangle_lr(
                within,
                cycle_steps=self.plan.cycle_steps,
                lr_low=self.tickets.lr_low,
                lr_high=self.tickets.lr_high,
            )
        s = self.schedule
        if s.lr_schedule == "step":
            lr = schedules.step_decay_lr(
                step, base_lr=self.base_lr, milestones=list(self.plan.lr_milestones), gamma=s.lr_gamma
            )
        elif s.lr_schedule == "cosine":
            span = self.plan.base_lr_steps or self.plan.pre_steps
            lr = schedules.cosine_lr(step, base_lr=self.base_lr, min_lr=s.min_lr, steps=span)
        else:
            lr = self.base_lr
        return lr * schedules.warmup_factor(
            step, warmup_steps=self.plan.warmup_steps, start_factor=s.warmup_start_factor
        )

    def drop_fraction(self, step: int) -> float:
        s = self.sparse
        return schedules.drop_fraction_at(
            step,
            initial=s.drop_fraction,
            final=s.drop_fraction_final,
            schedule=s.drop_fraction_schedule,
            steps=self.plan.total_steps,
        )

    def phase(self, step: int) -> tuple[str, int | None]:
        """("dst", None) in phase 1, ("cycle", m) in cycle m, for the step after ``step``."""
        cycle = self.phases.cycle_of(step)
        return ("dst", None) if cycle is None else ("cycle", cycle)

    def mask_events(self, completed: int) -> list[str]:
        """Mask changes due right after ``completed`` steps: 'prune', 'update', 'reexplore'."""
        events = []
        pre, total, interval = self.plan.pre_steps, self.plan.total_steps, self.sparse.update_interval
        if 0 < completed <= pre and self.method.prune_density(completed) is not None:
            events.append("prune")  # a global prune comes before the topology update of the step
        if 0 < completed < pre and completed % interval == 0:
            events.append("update")
        if self.phases.cycle_start(completed) is not None and self.tickets.reexplore_fraction > 0:
            events.append("reexplore")
        elif (
            self.tickets.mask_in_cycles == "update" and pre < completed < total and completed % interval == 0
        ):
            events.append("update")
        return events

    def needs_grad_scores(self, completed: int) -> bool:
        """Whether an event after ``completed`` steps grows by gradient (the dense gradient must be
        kept before the masks zero it)."""
        events = [e for e in self.mask_events(completed) if e != "prune"]
        return any(self.drop_and_grow_rule(e, completed)[1] == "gradient" for e in events)

    def drop_and_grow_rule(self, event: str, completed: int) -> tuple[float, str]:
        """(drop fraction, grow criterion) of an 'update' (the method's) or a cycle's 'reexplore'
        (``tickets.reexplore_fraction``, by gradient) after ``completed`` steps."""
        if event == "reexplore":
            return self.tickets.reexplore_fraction, "gradient"
        return self.drop_fraction(completed), self.method.grow
