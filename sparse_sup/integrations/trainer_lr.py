"""The Trainer's LR under Sup-tickets: the user's scheduler owns phase 1 (and the whole budget with
``tickets_schedule="tail"`` or ``"tail_cycles"``), the engine's timeline owns the cycles' triangle,
and the real step writes the LR into every parameter group at its ratio to group 0."""

from __future__ import annotations

import torch

from ..engine import SupTicketsEngine


class TrainerEngine(SupTicketsEngine):
    """The CLI's engine; only phase 1's LR differs: it is the Trainer's scheduler (``phase1_lr``)."""

    def __init__(self, *, phase1_lr, **kwargs) -> None:
        super().__init__(**kwargs)
        self.phase1_lr = phase1_lr

    def lr(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        if self.timeline.triangle_cycle(step) is not None:
            return super().lr(step)  # the cycle's triangle
        return self.phase1_lr(step)  # phase 1 (with tickets_schedule="tail": the whole budget)


class SupTicketsLR:
    """The Trainer's ``lr_scheduler``: the user's scheduler, read by the engine as phase 1's LR; the
    real step writes the LR (phase 1, then the cycle triangle) into every parameter group.

    The wrapped scheduler advances with the engine's applied steps only (the Trainer also steps it
    after a step the backend skipped as non-finite). ``get_last_lr`` is what the Trainer logs as
    ``learning_rate`` (read after the step, before this scheduler's ``step``: the LR that step used)."""

    def __init__(self, inner, trainer) -> None:
        self.inner, self.trainer = inner, trainer

    @property
    def optimizer(self):
        return self.inner.optimizer

    def step(self, *args, **kwargs) -> None:
        if self.inner.last_epoch < self.trainer.sparse_engine.step:
            self.inner.step(*args, **kwargs)

    def phase1_lr(self, step: int) -> float:
        """The user's LR for ``step`` (group 0): a pure function for ``LambdaLR`` schedulers (every
        ``lr_scheduler_type`` of ``TrainingArguments``), else what the scheduler holds now."""
        inner = self.inner
        if isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
            return float(inner.base_lrs[0] * inner.lr_lambdas[0](step))
        return float(inner.get_last_lr()[0])

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
