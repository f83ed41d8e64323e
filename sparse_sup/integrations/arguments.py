"""``SparsityArguments``: the sparse-training and ticket settings of a Hugging Face ``Trainer`` run,
as a dataclass ``HfArgumentParser`` parses next to ``TrainingArguments``. Keys are the CLI's
``sparse.*`` / ``tickets.*`` keys with ``_`` for ``.``; epoch-based ones become steps, because the
Trainer's own step count (``max_steps``, or epochs x update steps per epoch) is the budget.

No transformers import here: the dataclass and the plan are plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config.plan import PlanKeys, StepPlan, plan_steps
from ..config.schema import ScheduleConfig, SparseConfig, TicketsConfig

TRAINER_PLAN_KEYS = PlanKeys(
    num_cycles="tickets_num_cycles",
    cycle_length="tickets_cycle_steps / tickets_cycles_fraction",
    budget="max_steps / num_train_epochs",
)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class SparsityArguments:
    """Dynamic sparse training (phase 1) and cheap tickets (phase 2) for ``SupTicketsTrainer``."""

    # ---- phase 1: the DST method -------------------------------------------------------------
    sparse_method: str = field(
        default="rigl",
        metadata=_help(
            "a registered DST method (sparse_sup.methods.METHODS: set, rigl, granet, and any registered "
            "with @register_method); checked against the registry when the arguments are built"
        ),
    )
    sparse_density: float = field(default=0.1, metadata=_help("fraction of target weights kept, in (0, 1]"))
    sparse_distribution: Literal["erk", "uniform"] = field(
        default="erk", metadata=_help("per-layer densities")
    )
    sparse_update_interval: int = field(
        default=1000, metadata=_help("optimizer steps between topology updates (delta T)")
    )
    sparse_drop_fraction: float = field(default=0.5, metadata=_help("fraction of active weights re-chosen"))
    sparse_drop_fraction_schedule: Literal["constant", "cosine"] = field(default="constant")
    sparse_drop_fraction_final: float = field(default=0.005, metadata=_help("end of the cosine schedule"))
    sparse_granet_initial_density: float = field(default=0.5, metadata=_help("granet: density at step 0"))
    sparse_granet_prune_start_step: int = field(default=0, metadata=_help("granet: first pruning step"))
    sparse_granet_prune_end_step: int | None = field(
        default=None, metadata=_help("granet: last pruning step (default: the end of phase 1)")
    )
    sparse_include: list[str] | None = field(
        default=None,
        metadata=_help("glob patterns of parameter names to sparsify (default: every conv/linear weight)"),
    )
    sparse_exclude: list[str] | None = field(
        default=None, metadata=_help("glob patterns of parameter names kept dense")
    )
    sparse_enforce_every_step: bool = field(
        default=True, metadata=_help("re-zero masked weights and optimizer state after every step")
    )
    sparse_check_ranks: bool = field(default=False, metadata=_help("debug: compare masks across ranks"))
    sparse_seed: int | None = field(
        default=None, metadata=_help("seed of masks and random regrowth (default: TrainingArguments.seed)")
    )
    # ---- phase 2: cheap tickets ----------------------------------------------------------------
    tickets_num_cycles: int = field(default=3, metadata=_help("number of tickets; 0: the plain DST method"))
    tickets_schedule: Literal["cycles", "tail", "tail_cycles"] = field(
        default="cycles",
        metadata=_help(
            "cycles: the paper's, the Trainer's scheduler over phase 1, then a triangle LR per cycle; "
            "tail: the Trainer's scheduler over the whole budget, the tickets taken at equal steps through "
            "its last part (no step leaves phase 1; tickets_lr_low/high unused); tail_cycles: the "
            "Trainer's scheduler over the whole budget, its last part replaced by the cycles"
        ),
    )
    tickets_cycle_steps: int | None = field(
        default=None, metadata=_help("optimizer steps per cycle (or give tickets_cycles_fraction)")
    )
    tickets_cycles_fraction: float | None = field(
        default=None, metadata=_help("fraction of the whole budget spent in cycles (default 0.1)")
    )
    tickets_lr_low: float = field(default=1e-3, metadata=_help("cycle LR at each cycle's start and end"))
    tickets_lr_high: float = field(default=5e-3, metadata=_help("cycle LR at mid-cycle"))
    tickets_reexplore_fraction: float | None = field(
        default=None,
        metadata=_help(
            "drop/regrow-by-gradient fraction at each cycle start; 0: off; default 0.5 (cycles), 0 (tail, "
            "tail_cycles)"
        ),
    )
    tickets_mask_in_cycles: Literal["frozen", "update"] = field(default="frozen")
    tickets_merge: Literal["caa", "ema"] = field(default="caa")
    tickets_ema_ticket_weight: float = field(
        default=0.5, metadata=_help("merge=ema: S <- (1 - w) * S + w * T_i (w weights the new ticket)")
    )
    tickets_reprune: Literal["every", "end"] = field(default="every")
    tickets_include_phase1_model: bool = field(default=True, metadata=_help("S_0 = P"))
    tickets_bn_recalibration: bool = field(default=True, metadata=_help("recalibrate BatchNorm of each S_i"))
    tickets_bn_recal_batches: int | None = field(
        default=None, metadata=_help("batches of BN recalibration (default: one pass over the train set)")
    )
    tickets_bn_recal_batch_size: int | None = field(
        default=None, metadata=_help("batch size of BN recalibration (default: per_device_eval_batch_size)")
    )
    tickets_save: bool = field(default=True, metadata=_help("write tickets and S_i under output_dir/tickets"))

    def __post_init__(self) -> None:
        self.sparse_config()  # validate now: a bad value stops the script before the Trainer starts
        self.tickets_config()
        if self.tickets_num_cycles and self.tickets_cycle_steps is not None and self.tickets_cycle_steps < 2:
            raise ValueError(
                f"tickets_cycle_steps={self.tickets_cycle_steps} is invalid: cycles need >= 2 optimizer steps"
            )
        for key in ("sparse_granet_prune_start_step", "sparse_granet_prune_end_step"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"{key}={value} is invalid: a number of optimizer steps >= 0")

    @staticmethod
    def _renamed(error: ValueError) -> ValueError:
        """Config errors name CLI keys (``sparse.density``); here the argument is ``sparse_density``."""
        return ValueError(str(error).replace("sparse.", "sparse_").replace("tickets.", "tickets_"))

    def sparse_config(self) -> SparseConfig:
        try:
            return SparseConfig(
                method=self.sparse_method,
                density=self.sparse_density,
                distribution=self.sparse_distribution,
                update_interval=self.sparse_update_interval,
                drop_fraction=self.sparse_drop_fraction,
                drop_fraction_schedule=self.sparse_drop_fraction_schedule,
                drop_fraction_final=self.sparse_drop_fraction_final,
                granet_initial_density=self.sparse_granet_initial_density,
                include=self.sparse_include,
                exclude=list(self.sparse_exclude or []),
                enforce_every_step=self.sparse_enforce_every_step,
                check_ranks=self.sparse_check_ranks,
            )
        except ValueError as e:
            raise self._renamed(e) from None

    def tickets_config(self) -> TicketsConfig:
        try:
            return TicketsConfig(
                num_cycles=self.tickets_num_cycles,
                schedule=self.tickets_schedule,
                cycles_fraction=self.tickets_cycles_fraction,
                lr_low=self.tickets_lr_low,
                lr_high=self.tickets_lr_high,
                reexplore_fraction=self.tickets_reexplore_fraction,
                mask_in_cycles=self.tickets_mask_in_cycles,
                merge=self.tickets_merge,
                ema_ticket_weight=self.tickets_ema_ticket_weight,
                reprune=self.tickets_reprune,
                include_phase1_model=self.tickets_include_phase1_model,
                bn_recalibration=self.tickets_bn_recalibration,
                bn_recal_batches=self.tickets_bn_recal_batches,
            )
        except ValueError as e:
            raise self._renamed(e) from None

    @staticmethod
    def schedule_config() -> ScheduleConfig:
        """Phase 1's LR comes from the Trainer's scheduler; the engine's own phase-1 schedule is unused."""
        return ScheduleConfig(lr_schedule="constant", lr_milestones=[])

    def plan(self, total_steps: int, steps_per_epoch: int) -> StepPlan:
        """The phase plan over the Trainer's ``total_steps`` optimizer steps: ``config.plan``'s
        ``plan_steps``, the CLI's arithmetic. Raises ``ValueError`` naming the arguments when the
        budget is too small."""
        return plan_steps(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            num_cycles=self.tickets_num_cycles,
            cycle_steps=self.tickets_cycle_steps,
            cycles_fraction=self.tickets_cycles_fraction,
            prune_start=self.sparse_granet_prune_start_step,
            prune_end=self.sparse_granet_prune_end_step,
            ticket_schedule=self.tickets_schedule,
            keys=TRAINER_PLAN_KEYS,
            budget="the Trainer's optimizer steps",
        )
