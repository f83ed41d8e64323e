"""Pure functions of the optimizer-step count: phases, learning rates, drop fraction, GraNet
density. ``step`` is always the number of optimizer steps completed before the one in question."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PhasePlan:
    """Phase 1 is steps [0, pre_steps); cycle m is [pre_steps + m*cycle_steps, ... + cycle_steps)."""

    total_steps: int
    num_cycles: int
    cycle_steps: int

    def __post_init__(self) -> None:
        if self.num_cycles < 0 or self.cycle_steps < 0:
            raise ValueError("num_cycles and cycle_steps must be >= 0")
        if self.num_cycles > 0 and self.cycle_steps < 1:
            raise ValueError(f"{self.num_cycles} cycles need cycle_steps >= 1, got {self.cycle_steps}")
        if self.num_cycles * self.cycle_steps >= self.total_steps:
            raise ValueError(
                f"{self.num_cycles} cycles x {self.cycle_steps} steps do not fit in a budget of "
                f"{self.total_steps} steps: phase 1 needs at least one step; use fewer or shorter cycles"
            )

    @property
    def pre_steps(self) -> int:
        return self.total_steps - self.num_cycles * self.cycle_steps

    def cycle_of(self, step: int) -> int | None:
        """Cycle index of the optimizer step taken after ``step`` completed ones (None: phase 1)."""
        if step < self.pre_steps or self.cycle_steps == 0:
            return None
        return min((step - self.pre_steps) // self.cycle_steps, self.num_cycles - 1)

    def cycle_start(self, completed: int) -> int | None:
        """Cycle index that starts right after ``completed`` steps, else None."""
        offset = completed - self.pre_steps
        if self.num_cycles and offset >= 0 and offset % self.cycle_steps == 0:
            m = offset // self.cycle_steps
            return m if m < self.num_cycles else None
        return None

    def cycle_end(self, completed: int) -> int | None:
        """Cycle index that ends exactly when ``completed`` steps are done, else None."""
        offset = completed - self.pre_steps
        if self.num_cycles and offset > 0 and offset % self.cycle_steps == 0:
            return offset // self.cycle_steps - 1
        return None


def step_decay_lr(step: int, *, base_lr: float, milestones: list[int], gamma: float) -> float:
    return base_lr * gamma ** sum(step >= m for m in milestones)


def cosine_lr(step: int, *, base_lr: float, min_lr: float, steps: int) -> float:
    t = min(step, steps) / max(1, steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def warmup_factor(step: int, *, warmup_steps: int, start_factor: float) -> float:
    if step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def triangle_lr(step_in_cycle: int, *, cycle_steps: int, lr_low: float, lr_high: float) -> float:
    """Cyclic LR: the step that ends the cycle uses lr_low, the one ending its first half lr_high."""
    u = (step_in_cycle + 1) / cycle_steps
    return lr_low + (lr_high - lr_low) * (1.0 - abs(2.0 * u - 1.0))


def drop_fraction_at(step: int, *, initial: float, final: float, schedule: str, steps: int) -> float:
    """Fraction of active weights swapped at a topology update: constant or cosine-annealed."""
    if schedule == "constant":
        return initial
    if schedule == "cosine":
        return cosine_lr(step, base_lr=initial, min_lr=final, steps=steps)
    raise ValueError(f"unknown drop-fraction schedule {schedule!r}; allowed: constant, cosine")


def granet_density(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """GraNet's cubic schedule d(t) = d_f + (d_i - d_f) * (1 - progress)^3."""
    if end <= start:
        return final if step >= start else initial
    progress = min(1.0, max(0.0, (step - start) / (end - start)))
    return final + (initial - final) * (1.0 - progress) ** 3
