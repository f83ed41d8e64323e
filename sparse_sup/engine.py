"""The phase machine of Sup-tickets: when to update topology, when cycles start and end, and when
the superposition side chain (``tickets.bank``) takes a ticket. It sees the model only through a
``Backend`` (``backends/base.py``); data-dependent work (evaluation, BN recalibration passes,
saving) is delegated to ``EngineHooks`` (``hooks.py``).

Call order per optimizer step (only real steps count):
    backward(s) ... -> engine.before_optimizer_step() -> clip -> optimizer.step()
    -> engine.after_optimizer_step(skipped=...)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .config.plan import StepPlan
from .config.schema import Config, ScheduleConfig, SparseConfig, TicketsConfig
from .core import invariants
from .core.masks import MaskState
from .core.targets import Target
from .core.topology import drop_and_grow, global_prune
from .hooks import EngineHooks
from .methods import create_method
from .tickets.bank import TicketBank
from .tickets.superpose import SuperpositionChain
from .timeline import Timeline

if TYPE_CHECKING:
    from .backends.base import Backend

log = logging.getLogger(__name__)

__all__ = ["EngineHooks", "SupTicketsEngine"]


class SupTicketsEngine:
    def __init__(
        self,
        *,
        sparse: SparseConfig,
        tickets: TicketsConfig,
        schedule: ScheduleConfig,
        base_lr: float,
        plan: StepPlan,
        backend: Backend,
        seed: int,
        hooks: EngineHooks | None = None,
    ) -> None:
        self.sparse, self.tickets, self.schedule = sparse, tickets, schedule
        self.base_lr, self.plan, self.backend, self.seed = base_lr, plan, backend, seed
        self.hooks = hooks or EngineHooks()
        self.method = create_method(sparse, plan)
        self.timeline = Timeline(
            plan=plan, sparse=sparse, tickets=tickets, schedule=schedule, base_lr=base_lr, method=self.method
        )
        self.phases = self.timeline.phases
        self.step = 0  # optimizer steps completed
        self.targets: list[Target] = backend.targets()
        self.masks: MaskState | None = None
        self.bank = TicketBank(tickets, backend)  # the superposition side chain S
        self.num_tickets = 0
        self._grad_scores: dict[str, torch.Tensor] | None = None
        backend.attach(self)  # DeepSpeed runs this engine inside its own optimizer step

    @classmethod
    def from_config(
        cls, config: Config, plan: StepPlan, backend: Backend, hooks: EngineHooks | None = None
    ) -> SupTicketsEngine:
        """The engine a run's config describes (base LR from ``optim.lr``, seed from ``experiment``)."""
        return cls(
            sparse=config.sparse,
            tickets=config.tickets,
            schedule=config.schedule,
            base_lr=config.optim.lr,
            plan=plan,
            backend=backend,
            seed=config.experiment.seed,
            hooks=hooks,
        )

    # ---- set-up -------------------------------------------------------------------------
    def init_masks(self) -> None:
        self.masks = MaskState.initialize(
            self.targets, self.method.initial_density, self.sparse.distribution, self.seed, self.backend.shard
        )
        self.backend.refresh_model_weights()
        log.info(
            "masks initialised: density %.4f over %d targets (%s)",
            self.masks.density(self.targets),
            len(self.targets),
            self.sparse.distribution,
        )

    @property
    def total_target_weights(self) -> int:
        return sum(t.numel for t in self.targets)

    @property
    def final_keep(self) -> int:
        """k = floor(d_final * N), the number of target weights S keeps."""
        return math.floor(self.sparse.density * self.total_target_weights)

    @property
    def chain(self) -> SuperpositionChain | None:
        return self.bank.chain

    def chain_density(self) -> float:
        """Density of S's target masks (global)."""
        return self.bank.density(self.total_target_weights)

    # ---- schedules (the timeline's, at the engine's step by default) ---------------------
    def lr(self, step: int | None = None) -> float:
        """LR (group 0) for the optimizer step taken after ``step`` completed steps (default: now)."""
        return self.timeline.lr(self.step if step is None else step)

    def phase(self, step: int | None = None) -> tuple[str, int | None]:
        """("dst", None) in phase 1, ("cycle", m) in cycle m, for the step after ``step``."""
        return self.timeline.phase(self.step if step is None else step)

    # ---- the step -----------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """At the sync boundary, after backward and unscaling, before clipping: keep the dense
        gradient if an update will need it, then zero the gradients of masked weights."""
        if self.timeline.needs_grad_scores(self.step + 1):
            self._grad_scores = {
                t.name: g.detach().abs() if (g := t.grad()) is not None else torch.zeros_like(t.param)
                for t in self.targets
            }
        self.masks.apply_to_grads(self.targets)
        if self.sparse.check_invariants:
            invariants.check_gradients(self.targets, self.masks, f"before step {self.step + 1}")

    def after_optimizer_step(self, skipped: bool = False) -> None:
        """After the real optimizer step. A skipped step (overflow, non-finite) changes nothing."""
        try:
            if not skipped:
                if self.sparse.enforce_every_step:
                    self.masks.apply(self.targets)
                self.step += 1
                self._on_completed(self.step)
        finally:
            self._grad_scores = None
        if self.sparse.check_invariants:
            where = f"after step {self.step}" + (" (skipped one)" if skipped else "")
            weights = self.sparse.enforce_every_step
            invariants.check_step(self.targets, self.masks, self.backend.data_parallel, where, weights)

    def acts_after(self, completed: int) -> bool:
        """Whether completing step ``completed`` makes the engine act (a mask event, the end of phase
        1, a ticket, the end): the loop must know such a step exactly, so it never defers it."""
        return (
            bool(self.timeline.mask_events(completed))
            or completed in (self.plan.pre_steps, self.plan.total_steps)
            or self.phases.cycle_end(completed) is not None
        )

    def _on_completed(self, completed: int) -> None:
        events = self.timeline.mask_events(completed)
        if completed < self.plan.pre_steps:
            self._apply_mask_events(events, completed)
        if completed == self.plan.pre_steps:
            self._apply_mask_events([e for e in events if e == "prune"], completed)
            if self.plan.num_cycles and self.tickets.include_phase1_model:
                self.bank.merge()
            self.hooks.on_phase1_end(self)
        ended = self.phases.cycle_end(completed)
        if ended is not None:
            self._make_ticket(ended)
        if completed >= self.plan.pre_steps and completed < self.plan.total_steps:
            self._apply_mask_events([e for e in events if e != "prune"], completed)
        if completed == self.plan.total_steps:
            self._finish()

    def _apply_mask_events(self, events: Sequence[str], completed: int) -> None:
        for event in events:
            if event == "prune":
                keep = round(self.method.prune_density(completed) * self.total_target_weights)
                before = self.masks.total_active()
                global_prune(self.targets, self.masks, keep, self.backend.shard)
                swapped = {"pruned": before - self.masks.total_active()}
            else:
                fraction, grow = self.timeline.drop_and_grow_rule(event, completed)
                shard, scores = self.backend.shard, self._grad_scores
                swapped = drop_and_grow(
                    self.targets, self.masks, fraction, grow, completed, self.seed, shard, scores
                )
            self.backend.refresh_model_weights()
            if self.sparse.check_ranks:  # debug: every data-parallel replica holds the same masks
                invariants.check_rank_agreement(
                    self.masks, self.targets, self.backend.data_parallel, f"{event} at step {completed}"
                )
            self.hooks.on_topology_update(self, event, swapped)

    # ---- tickets and superposition ------------------------------------------------------
    def _make_ticket(self, index: int) -> None:
        self.num_tickets = index + 1
        log.info("ticket T_%d ready at step %d", index + 1, self.step)
        self.hooks.on_ticket(self, index)
        self.bank.merge()
        if self.tickets.reprune == "every" or index == self.plan.num_cycles - 1:
            self.chain.reprune(self.targets, self.final_keep, self.backend.shard)
        with self.bank.holding_superposed():  # the model holds S_i; training continues on T_i after
            if self.tickets.bn_recalibration:
                self.hooks.recalibrate_bn(self)
            self.hooks.on_superposed(self, index)

    def _finish(self) -> None:
        """The final model is S_M: install its tensors and masks in place."""
        if self.chain is None or self.num_tickets == 0:
            return
        self.bank.install(self.masks, self.targets)
        log.info(
            "final model is S_%d: %d target weights kept (density %.4f)",
            self.num_tickets,
            self.masks.total_active(),
            self.masks.density(self.targets),
        )

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the engine needs to continue exactly: counters, masks and the chain, keyed
        by name, in this rank's placement (each rank saves its own)."""
        return {
            "step": self.step,
            "num_tickets": self.num_tickets,
            "targets": [t.name for t in self.targets],
            "masks": self.masks.state_dict(),
            "chain": self.bank.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore on the same model, engine and world size (with or without ``init_masks()``
        first: the saved masks replace any initial ones; the weights are left as they are)."""
        names = [t.name for t in self.targets]
        if state["targets"] != names:
            raise ValueError(
                f"checkpoint targets {state['targets'][:3]}... differ from this model's {names[:3]}...; "
                "resume with the same model and sparse.include/exclude"
            )
        if self.masks is None:
            self.masks = MaskState.from_state(state["masks"], self.targets, self.backend.shard)
        else:
            self.masks.load_state_dict(state["masks"])
        self.step, self.num_tickets = state["step"], state["num_tickets"]
        self.bank.load_state_dict(state["chain"], self.targets[0].param.device if self.targets else None)

    def rebind(self) -> None:
        """Re-read the backend's targets (after an engine replaced tensors, e.g. a checkpoint load)."""
        self.targets = self.backend.targets()
