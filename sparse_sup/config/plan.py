"""Turn epoch-based settings into optimizer-step counts, once, when the data size is known."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .schema import Config, ScheduleConfig


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
    # the whole budget with tickets.schedule=tail; None: pre_steps
    base_lr_steps: int | None = None

    @property
    def pre_steps(self) -> int:
        return self.total_steps - self.num_cycles * self.cycle_steps

    @property
    def cycles_fraction(self) -> float:
        return self.num_cycles * self.cycle_steps / self.total_steps

    def describe(self) -> str:
        return (
            f"{self.total_steps} steps ({self.steps_per_epoch}/epoch): phase 1 {self.pre_steps} steps "
            f"({100 * (1 - self.cycles_fraction):.0f}%), {self.num_cycles} cycles x {self.cycle_steps} "
            f"steps ({100 * self.cycles_fraction:.0f}% of the budget)"
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


def resolve_plan(config: Config, num_train_samples: int) -> StepPlan:
    """Raises ``ConfigError`` naming the keys when the budget cannot hold the requested phases."""
    batch = config.schedule.batch_size
    steps_per_epoch = num_train_samples // batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"schedule.batch_size={batch} is larger than the training set ({num_train_samples} samples)"
        )
    total = round(config.schedule.epochs * steps_per_epoch)
    t = config.tickets
    if t.num_cycles == 0:
        cycle_steps = 0
    elif t.cycle_epochs is not None:
        cycle_steps = round(t.cycle_epochs * steps_per_epoch)
    else:
        fraction = 0.1 if t.cycles_fraction is None else t.cycles_fraction
        cycle_steps = round(fraction * total / t.num_cycles)
    if t.num_cycles and cycle_steps < 2:
        raise ConfigError(
            f"tickets.num_cycles={t.num_cycles} gives cycles of {cycle_steps} optimizer steps, too short "
            "(need >= 2); use fewer cycles or raise tickets.cycle_epochs / tickets.cycles_fraction or "
            "schedule.epochs"
        )
    if t.num_cycles * cycle_steps >= total:
        raise ConfigError(
            f"tickets.num_cycles={t.num_cycles} x {cycle_steps} steps per cycle do not fit in "
            f"schedule.epochs={config.schedule.epochs} ({total} steps): phase 1 would have no steps; "
            "use fewer or shorter cycles, or more epochs"
        )
    pre = total - t.num_cycles * cycle_steps
    lr_span = total if t.schedule == "tail" else pre
    s = config.sparse
    return StepPlan(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        num_cycles=t.num_cycles,
        cycle_steps=cycle_steps,
        warmup_steps=round(config.schedule.warmup_epochs * steps_per_epoch),
        lr_milestones=tuple(round(m * lr_span) for m in config.schedule.lr_milestones),
        prune_start=round(s.granet_prune_start_epoch * steps_per_epoch),
        prune_end=min(pre, round(s.granet_prune_end_epoch * steps_per_epoch)),
        base_lr_steps=lr_span,
    )
