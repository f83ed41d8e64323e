"""``SupTicketsTrainer``: Sup-tickets inside a Hugging Face ``Trainer``, on the CLI's engine and backends.

The Trainer keeps its loop (data, accumulation, clipping, mixed precision, DDP / DeepSpeed / FSDP2,
logging, checkpoints); the ``SupTicketsEngine`` runs around its optimizer step exactly as in the CLI:

- at the sync boundary, before the Trainer clips (end of ``training_step``), the engine reads RigL
  scores from the accumulated, unclipped gradient and zeroes masked gradients; under DeepSpeed the
  backend's wrapper does this inside DeepSpeed's own step (which runs inside ``backward``);
- after the real optimizer step (a wrapper around the Trainer's optimizer ``step``, or DeepSpeed's)
  it enforces masks and counts the step unless it was skipped (fp16 overflow);
- the phase plan is the Trainer's own step count; the LR is the user's scheduler (built over phase 1)
  and the triangle in the cycles, which is what the Trainer logs as ``learning_rate``;
- engine state (masks, counters, superposition chain) is saved per rank into every Trainer checkpoint
  (``checkpoint-N/sparse_sup/rank{r}.pt``) and restored by ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..backends import build_backend
from ..backends.fsdp2 import check_fsdp2_mixed_precision
from ..checkpoint import atomic_torch_save, load_verified
from ..checkpoint.tickets import save_model_checkpoint
from ..core.masks import MaskState
from ..engine import EngineHooks, SupTicketsEngine
from ..models import select_targets
from .arguments import SparsityArguments
from .hf_data import recalibration_batches

log = logging.getLogger(__name__)

STATE_DIR = "sparse_sup"


class TrainerEngine(SupTicketsEngine):
    """The CLI's engine; only phase 1's LR differs: it is the Trainer's scheduler (``phase1_lr``)."""

    def __init__(self, *, phase1_lr, **kwargs) -> None:
        super().__init__(**kwargs)
        self.phase1_lr = phase1_lr

    def lr(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        if self.phases.cycle_of(step) is not None:
            return super().lr(step)
        return self.phase1_lr(step)


class SupTicketsLR:
    """The Trainer's ``lr_scheduler``: the user's scheduler in phase 1, the cycle triangle after.

    Stepped once per applied optimizer step (by the Trainer), like the scheduler it wraps, so the
    two counters agree with the engine's. ``get_last_lr`` is what the Trainer logs as ``learning_rate``
    (read after the step, before this scheduler's ``step``: the LR that step used)."""

    def __init__(self, inner, trainer: SupTicketsTrainer) -> None:
        self.inner, self.trainer = inner, trainer

    @property
    def optimizer(self):
        return self.inner.optimizer

    def step(self, *args, **kwargs) -> None:
        self.inner.step(*args, **kwargs)
        self.apply_cycle_lr()

    def apply_cycle_lr(self) -> None:
        engine = self.trainer.sparse_engine
        if engine is not None and engine.phases.cycle_of(engine.step) is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = engine.lr()

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


class _Hooks(EngineHooks):
    """Evaluates P, each ticket and each S_i through the Trainer; saves tickets; BN recalibration."""

    def __init__(self, trainer: SupTicketsTrainer) -> None:
        self.trainer = trainer

    def on_phase1_end(self, engine: SupTicketsEngine) -> None:
        self.trainer._record("P", snapshot="P")

    def on_ticket(self, engine: SupTicketsEngine, index: int) -> None:
        self.trainer._record(f"T_{index + 1}", snapshot=f"T_{index + 1}")

    def recalibrate_bn(self, engine: SupTicketsEngine) -> None:
        self.trainer._recalibrate_bn(counter=engine.num_tickets)

    def on_superposed(self, engine: SupTicketsEngine, index: int) -> None:
        if engine.chain.masks:  # re-pruned S_i
            self.trainer._record(
                f"S_{index + 1}",
                snapshot=f"S_{index + 1}",
                masks=engine.chain.masks,
                density=engine.chain_density(),
            )
        else:  # re-prune deferred to the end: S_i is the union of the tickets' supports
            self.trainer._record(f"S_{index + 1}", snapshot=f"S_{index + 1}", masks={})

    def on_topology_update(self, engine: SupTicketsEngine, kind: str, swapped: dict[str, int]) -> None:
        log.info(
            "step %d %s: density %.4f, %d weights moved",
            engine.step,
            kind,
            engine.masks.density(engine.targets),
            sum(swapped.values()),
        )


class _StartCallback(TrainerCallback):
    """First in the callback list: the engine exists before any user callback sees the run."""

    def __init__(self, trainer: SupTicketsTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._start_engine()


def _accuracy(eval_pred) -> dict[str, float]:
    """Default ``compute_metrics`` (when the user gives none): top-1 accuracy of the logits."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


class SupTicketsTrainer(Trainer):
    """A ``transformers.Trainer`` that trains the model sparse (SET / RigL / GraNet) and spends the
    last part of the budget on cheap tickets, superposed into the final model S_M.

    ``sparsity_args``: a ``SparsityArguments`` (default: its defaults). Everything else is the
    ``Trainer``'s. Without ``compute_metrics``, evaluations report top-1 ``accuracy``."""

    def __init__(self, *args, sparsity_args: SparsityArguments | None = None, **kwargs) -> None:
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = _accuracy
        super().__init__(*args, **kwargs)
        self.sparsity_args = sparsity_args or SparsityArguments()
        if self.args.load_best_model_at_end:
            raise ValueError(
                "SupTicketsTrainer: load_best_model_at_end=True would replace the superposed model S_M "
                "with an earlier checkpoint; set it to False"
            )
        if self.is_fsdp_enabled:
            if getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
                raise ValueError(
                    "SupTicketsTrainer supports FSDP2 only: pass fsdp_config={'fsdp_version': 2}"
                )
            check_fsdp2_mixed_precision(self.model, self.accelerator.mixed_precision)
        sa = self.sparsity_args
        self.target_names = select_targets(self.model, sa.sparse_include, sa.sparse_exclude)
        if not self.target_names:
            raise ValueError("no parameter is sparsified: check sparse_include / sparse_exclude")
        self.sparse_engine: TrainerEngine | None = None
        self.sparse_backend = None
        self.sparse_plan = None
        self.sparse_results: dict[str, dict] = {}
        self.skipped_steps = 0
        self._sup_steps_per_epoch = 1
        self._sup_resume: str | None = None
        self.callback_handler.callbacks.insert(0, _StartCallback(self))

    # ---- plan and LR ----------------------------------------------------------------------------
    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._sup_steps_per_epoch = values[1]  # optimizer steps per epoch, accumulation included
        return values

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The user's scheduler over phase 1 (``num_training_steps`` = the Trainer's budget), wrapped."""
        self.sparse_plan = self.sparsity_args.plan(num_training_steps, self._sup_steps_per_epoch)
        log.info("Sup-tickets plan: %s", self.sparse_plan.describe())
        if isinstance(self.lr_scheduler, SupTicketsLR):
            self.lr_scheduler = self.lr_scheduler.inner
        inner = super().create_scheduler(self.sparse_plan.pre_steps, optimizer)
        self.lr_scheduler = SupTicketsLR(inner, self)
        return self.lr_scheduler

    # ---- the engine around the Trainer's step -----------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no checkpoint found in {self.args.output_dir}"
                )
        self._sup_resume = resume_from_checkpoint or None
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        engine = self.sparse_engine
        if engine.step < self.sparse_plan.total_steps:
            log.warning(
                "training stopped at optimizer step %d of %d (%d skipped): the final model is not S_M",
                engine.step,
                self.sparse_plan.total_steps,
                self.skipped_steps,
            )
        self._record("final")
        return output

    def _start_engine(self) -> None:
        sa = self.sparsity_args
        backend = build_backend(self.model_wrapped, self.optimizer, self.target_names)
        engine = TrainerEngine(
            sparse=sa.sparse_config(),
            tickets=sa.tickets_config(),
            schedule=sa.schedule_config(),
            base_lr=self.args.learning_rate,
            plan=self.sparse_plan,
            backend=backend,
            seed=self.args.seed if sa.sparse_seed is None else sa.sparse_seed,
            hooks=_Hooks(self),
            phase1_lr=self.lr_scheduler.phase1_lr,
        )
        self.sparse_backend, self.sparse_engine = backend, engine
        self.sparse_results, self.skipped_steps = {}, 0
        # the engine attached itself to the backend: under DeepSpeed it runs inside DeepSpeed's step
        # (which runs inside backward); a torch optimizer's step is the Trainer's, wrapped here
        if not self.is_deepspeed_enabled:
            self._wrap_optimizer_step()
        if self._sup_resume:
            self._load_sparse_state(self._sup_resume)  # the Trainer already restored weights and optimizer
        else:
            engine.init_masks()
        self.lr_scheduler.apply_cycle_lr()
        log.info(
            "Sup-tickets: %s over %d process(es), %d targets, density %.4f",
            backend.kind,
            self.args.world_size,
            len(engine.targets),
            engine.masks.density(engine.targets),
        )

    def _wrap_optimizer_step(self) -> None:
        """After the Trainer's real ``optimizer.step()``: enforce masks, count the step if applied."""
        optimizer, original = self.optimizer, self.optimizer.step

        @functools.wraps(original)  # keeps the LR scheduler's marker on the step it wrapped
        def step(*args, **kwargs):
            result = original(*args, **kwargs)
            skipped = bool(self.accelerator.optimizer_step_was_skipped)
            self.skipped_steps += skipped
            self.sparse_engine.after_optimizer_step(skipped=skipped)
            return result

        optimizer.step = step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the sync boundary: gradients are accumulated and reduced, not yet clipped (the Trainer clips
        # next); DeepSpeed instead runs the engine inside its own step, within the backward above
        if not self.is_deepspeed_enabled and self.accelerator.sync_gradients:
            self.sparse_engine.before_optimizer_step()
        return loss

    # ---- evaluation, BN, tickets ----------------------------------------------------------------
    def _record(self, label: str, snapshot: str | None = None, masks=None, density=None) -> None:
        engine = self.sparse_engine
        result = {"step": engine.step}
        result["density"] = engine.masks.density(engine.targets) if density is None else density
        if self.eval_dataset is not None:
            metrics = self.evaluate(metric_key_prefix=label)
            result.update({k[len(label) + 1 :]: v for k, v in metrics.items() if k.startswith(label + "_")})
        self.sparse_results[label] = result
        log.info(
            "%s: %s", label, {k: v for k, v in result.items() if not k.endswith(("_per_second", "runtime"))}
        )
        if snapshot and self.sparsity_args.tickets_save:  # a sharded checkpoint, as the CLI writes
            meta = {
                "label": label,
                "world_size": self.args.world_size,
                "targets": self.target_names,
                **result,
            }
            save_model_checkpoint(
                Path(self.args.output_dir) / "tickets" / snapshot,
                self.sparse_backend,
                engine.masks.masks if masks is None else masks,
                {**meta, "model": type(self.sparse_backend.module).__name__},
                replace=True,
            )

    def _recalibrate_bn(self, counter: int) -> None:
        from ..tickets import recalibrate_batchnorm

        backend, sa = self.sparse_backend, self.sparsity_args
        module = backend.module
        batches = recalibration_batches(
            self,
            batch_size=sa.tickets_bn_recal_batch_size or self.args.per_device_eval_batch_size,
            num_batches=sa.tickets_bn_recal_batches,
            seed=self.args.seed if sa.sparse_seed is None else sa.sparse_seed,
            counter=counter,
            collectives=backend.data_parallel,
            lockstep=backend.lockstep,
        )
        recalibrate_batchnorm(module, batches, backend.data_parallel, forward=lambda inputs: module(**inputs))

    # ---- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """Engine state first (per rank), then the Trainer's own files: a checkpoint folder that has
        the Trainer's state always has the sparse state too."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        rank = self.args.process_index
        atomic_torch_save(
            {
                "engine": self.sparse_engine.state_dict(),
                "results": self.sparse_results,
                "skipped_steps": self.skipped_steps,
                "world_size": self.args.world_size,
            },
            folder / STATE_DIR / f"rank{rank}.pt",
        )
        super()._save_checkpoint(model, trial)

    def _load_sparse_state(self, checkpoint: str) -> None:
        path = Path(checkpoint) / STATE_DIR / f"rank{self.args.process_index}.pt"
        if not path.exists():
            raise ValueError(
                f"{checkpoint} has no sparse_sup state ({path.relative_to(checkpoint)} is missing): it "
                f"was not written by SupTicketsTrainer with {self.args.world_size} process(es); resume "
                "from one that was"
            )
        saved = load_verified(path)
        if saved["world_size"] != self.args.world_size:
            raise ValueError(
                f"{checkpoint} was written by {saved['world_size']} processes; resume with the same number "
                f"(now {self.args.world_size})"
            )
        engine = self.sparse_engine
        # load_state_dict expects the masks of init_masks(), which would also zero the restored weights
        # outside the *initial* masks: start from the saved masks instead (same placement, this rank's)
        engine.masks = MaskState(
            {
                t.name: saved["engine"]["masks"]["masks"][t.name].to(t.param.device).view(t.param.shape)
                for t in engine.targets
            },
            self.sparse_backend.shard,
        )
        engine.load_state_dict(saved["engine"])
        self.sparse_results = dict(saved["results"])
        self.skipped_steps = int(saved["skipped_steps"])
        log.info("resumed Sup-tickets state from %s at step %d", checkpoint, self.sparse_engine.step)

    # ---- reporting ----------------------------------------------------------------------------------
    def sup_tickets_summary(self) -> dict:
        """P, each T_i, each S_i and the final model, as the CLI's ``summary.json`` reports them."""
        engine, plan = self.sparse_engine, self.sparse_plan
        if engine is None:
            raise ValueError("sup_tickets_summary(): call trainer.train() first")
        done = engine.step >= plan.total_steps and engine.num_tickets
        return {
            "results": self.sparse_results,
            "final_is": f"S_{engine.num_tickets}" if done else f"not finished (step {engine.step})",
            "plan": {
                "total_steps": plan.total_steps,
                "pre_steps": plan.pre_steps,
                "num_cycles": plan.num_cycles,
                "cycle_steps": plan.cycle_steps,
                "cycles_fraction": plan.cycles_fraction,
            },
            "steps_completed": engine.step,
            "skipped_steps": self.skipped_steps,
            "method": self.sparsity_args.sparse_method,
            "density": self.sparsity_args.sparse_density,
            "world_size": self.args.world_size,
            "parallelism": self.sparse_backend.kind,
        }

    def sup_tickets_table(self) -> str:
        """The CLI's markdown table (needs an ``accuracy`` metric, the default ``compute_metrics``)."""
        from ..train.loop import summary_table

        summary = self.sup_tickets_summary()
        missing = [k for k, r in summary["results"].items() if not {"accuracy", "loss"} <= set(r)]
        if missing:
            raise ValueError(
                f"no accuracy/loss for {missing}: pass an eval_dataset (and a compute_metrics returning "
                "'accuracy', or none for the default)"
            )
        return summary_table(summary)


def checkpoint_state_path(checkpoint: str | os.PathLike, rank: int = 0) -> Path:
    """Where ``SupTicketsTrainer`` keeps rank ``rank``'s engine state inside a Trainer checkpoint."""
    return Path(checkpoint) / STATE_DIR / f"rank{rank}.pt"


__all__ = ["SparsityArguments", "SupTicketsLR", "SupTicketsTrainer", "TrainerEngine", "checkpoint_state_path"]
