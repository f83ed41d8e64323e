"""``SupTicketsTrainer``: Sup-tickets inside a Hugging Face ``Trainer``, on the CLI's engine and backends.

The Trainer keeps its loop (data, accumulation, mixed precision, DDP / DeepSpeed / FSDP2, logging,
checkpoints); the ``SupTicketsEngine`` runs inside the real optimizer step exactly as in the CLI, hooked
there by the backend's ``attach`` (torch optimizers: step hooks; DeepSpeed: its own step, run inside
``backward``), so nothing here depends on the engine:

- in the real step, before clipping, the engine reads RigL scores from the accumulated, unclipped,
  unscaled gradient and zeroes masked gradients; the backend then clips (``max_grad_norm``; the
  Trainer's own clipping is off, it only reads the norm for its logs), steps, enforces masks and
  counts the step unless it was skipped (fp16 overflow, non-finite gradient);
- the phase plan is the Trainer's step budget in *applied* optimizer steps: every skipped step adds one
  Trainer step to ``state.max_steps``, so a run with skips still ends with S_M;
- the LR is the user's scheduler (built over phase 1) and the triangle in the cycles, written into each
  parameter group at its ratio to group 0 in the real step: what the Trainer logs as ``learning_rate``;
- engine state (masks, counters, superposition chain) is saved into every Trainer checkpoint as the
  CLI's run checkpoints save it (``checkpoint-N/sparse_sup/``: masks and chain sharded with their global
  layout, each rank's rest in ``rankNNNNN.pt``; before the Trainer's files) and restored by
  ``train(resume_from_checkpoint=...)``, which only resumes from a folder holding both parts, at any
  world size the engine's checkpoint allows (one process, DDP, FSDP2; DeepSpeed at its own).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from ..backends import StepOptions, build_backend
from ..backends.fsdp2 import check_fsdp2_mixed_precision
from ..checkpoint import atomic_torch_save, load_verified, save_sharded
from ..checkpoint.run_state import world_size_problem
from ..checkpoint.sharded import MANIFEST
from ..checkpoint.state_pieces import parameter_layouts, rank_file, read_state, split_state
from ..checkpoint.tickets import save_model_checkpoint
from ..engine import EngineHooks, SupTicketsEngine
from ..models import select_targets
from ..results import run_summary, summary_table
from .arguments import SparsityArguments
from .hf_data import recalibration_batches
from .trainer_lr import SupTicketsLR, TrainerEngine

log = logging.getLogger(__name__)

STATE_DIR = "sparse_sup"
SHARDED = "sharded"  # under STATE_DIR: masks and chain with their global layout (any world size reads)
TRAINER_STATE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint folder
# LR schedulers driven by evaluation metrics, not by the step: no phase-1 LR as a function of the step
METRIC_DRIVEN_SCHEDULERS = {"reduce_lr_on_plateau", "greedy"}


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

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._extend_budget()  # before DefaultFlowCallback compares global_step with max_steps


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
        scheduler = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        if scheduler in METRIC_DRIVEN_SCHEDULERS or isinstance(
            self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
        ):
            raise ValueError(
                f"SupTicketsTrainer: lr_scheduler_type='{scheduler}' sets the LR from evaluation metrics, "
                "but Sup-tickets needs phase 1's LR as a function of the optimizer step (the cycles follow "
                "it in the plan); use a step schedule: lr_scheduler_type='linear', 'cosine', 'constant', ..."
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
        self._sup_steps_per_epoch = 1
        self._sup_resume: str | None = None
        self.callback_handler.callbacks.insert(0, _StartCallback(self))

    # ---- plan and LR ----------------------------------------------------------------------------
    def set_initial_training_values(self, args, dataloader):
        num_train_epochs, steps_per_epoch, *values = super().set_initial_training_values(args, dataloader)
        self._sup_steps_per_epoch = steps_per_epoch  # optimizer steps per epoch, accumulation included
        # the step budget (state.max_steps, grown by skipped steps) ends the run, not the epoch count:
        # what the Trainer itself does for a dataset without a length
        return sys.maxsize, steps_per_epoch, *values

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The user's scheduler over phase 1, or over the whole budget with ``tickets_schedule="tail"``
        or ``"tail_cycles"`` (``num_training_steps`` = the Trainer's budget), wrapped."""
        self.sparse_plan = self.sparsity_args.plan(num_training_steps, self._sup_steps_per_epoch)
        log.info("Sup-tickets plan: %s", self.sparse_plan.describe())
        if isinstance(self.lr_scheduler, SupTicketsLR):
            self.lr_scheduler = self.lr_scheduler.inner
        inner = super().create_scheduler(
            self.sparse_plan.base_lr_steps or self.sparse_plan.pre_steps, optimizer
        )
        self.lr_scheduler = SupTicketsLR(inner, self)
        return self.lr_scheduler

    # ---- the engine in the Trainer's step ---------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if self.sparse_engine is not None and not resume_from_checkpoint and self.model_init is None:
            raise ValueError(
                "SupTicketsTrainer.train() already ran: the model holds that sparse run's weights. Pass "
                "resume_from_checkpoint (a checkpoint folder, or True for the last one) to continue it, "
                "or build a new SupTicketsTrainer (or give model_init) to train again"
            )
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        elif resume_from_checkpoint:
            missing = self._missing_parts(Path(resume_from_checkpoint))
            if missing:
                raise ValueError(
                    f"{resume_from_checkpoint} is incomplete (no {', '.join(missing)}): its save was "
                    "interrupted, or it was not written by SupTicketsTrainer; resume from an earlier "
                    "checkpoint, or pass resume_from_checkpoint=True for the last complete one"
                )
        if resume_from_checkpoint:  # before the Trainer loads anything: refuse an impossible world size
            self._saved_rest(Path(resume_from_checkpoint))
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

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped (overflow, non-finite): the Trainer counts them, the engine does not."""
        return self.state.global_step - self.sparse_engine.step

    def _extend_budget(self) -> None:
        """The plan counts applied steps: the Trainer runs one more step for every skipped one."""
        max_steps = self.sparse_plan.total_steps + self.skipped_steps
        if max_steps != self.state.max_steps:
            log.info(
                "%d optimizer step(s) skipped: training runs to Trainer step %d",
                self.skipped_steps,
                max_steps,
            )
            self.state.max_steps = max_steps

    def _start_engine(self) -> None:
        sa = self.sparsity_args
        # the backend hooks the engine into whatever real step the Trainer's optimizer takes, and
        # clips there, after the engine zeroed masked gradients (DeepSpeed clips in its own step)
        options = StepOptions(max_grad_norm=self.args.max_grad_norm or None, external_step=True)
        backend = build_backend(self.model_wrapped, self.optimizer, self.target_names, options)
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
        self.sparse_results = {}
        if self._sup_resume:
            self._load_sparse_state(self._sup_resume)  # the Trainer already restored weights and optimizer
        else:
            engine.init_masks()
        self._extend_budget()  # by the steps a resumed run had skipped
        log.info(
            "Sup-tickets: %s over %d process(es), %d targets, density %.4f",
            backend.kind,
            self.args.world_size,
            len(engine.targets),
            engine.masks.density(engine.targets),
        )

    def _clip_grad_norm(self, model):
        """No clipping before the step: the backend clips inside it, after the engine read RigL scores
        from the unclipped gradient and zeroed masked ones. The Trainer then reads the (dense) gradient
        norm for its logs only."""
        return None

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
        """Sparse state first, as the CLI's run checkpoints hold it (``checkpoint.state_pieces``): masks
        and chain as sharded tensors with their global layout (``SHARDED``, published atomically once
        every rank wrote its part), and each rank's rest (counters, results, buffers in the chain) in
        its own file, written before; then the Trainer's own files, straight into the folder
        (transformers 5.x stages nothing) with ``trainer_state.json`` last. A crash in between leaves a
        folder lacking a part, which resuming refuses or skips."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        backend, directory = self.sparse_backend, folder / STATE_DIR
        if self.args.process_index == 0 and directory.exists():  # a step saved again (a resumed run)
            shutil.rmtree(directory)
        self.accelerator.wait_for_everyone()
        state = {"engine": self.sparse_engine.state_dict(), "results": self.sparse_results}
        pieces, rest = split_state(state, parameter_layouts(backend))
        written = {"world_size": self.args.world_size, "parallelism": backend.kind, "sharded_state": True}
        atomic_torch_save({"state": rest, **written}, directory / rank_file(self.args.process_index))
        save_sharded(directory / SHARDED, pieces, {"step": self.sparse_engine.step, **written})  # collective
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer reloads ``model.safetensors`` with ``load_state_dict(strict=False)``, but
        ``save_pretrained`` (transformers 5) writes some models (ViT, ...) under their legacy key names,
        so those weights were silently not restored. Such a checkpoint is read as ``from_pretrained``
        reads it (its key conversions), then loaded strictly. DeepSpeed and FSDP load elsewhere."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        file = Path(resume_from_checkpoint) / SAFE_WEIGHTS_NAME
        if not (isinstance(model, PreTrainedModel) and file.is_file()):
            return
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            saved = set(f.keys())
        if saved == set(model.state_dict()):
            return
        dtype = next(model.parameters()).dtype
        converted = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype).state_dict()
        model.load_state_dict(converted, strict=True)
        log.info("%s: weights saved under legacy names, loaded through from_pretrained", file)

    def _missing_parts(self, checkpoint: Path) -> list[str]:
        """What ``checkpoint`` lacks of a complete save: the sparse state, or the Trainer's state. The
        sharded part is published after every rank's file was written, so its manifest stands for all."""
        missing = [
            f"{STATE_DIR}/{part}"
            for part in (f"{SHARDED}/{MANIFEST}", rank_file(0))
            if not (checkpoint / STATE_DIR / part).is_file()
        ]
        try:
            json.loads((checkpoint / TRAINER_STATE).read_text())
        except (OSError, ValueError):  # absent, or cut short while written
            missing.append(TRAINER_STATE)
        return missing

    def _last_complete_checkpoint(self) -> str:
        """The newest checkpoint folder of ``output_dir`` holding both parts (warns for each skipped)."""
        found = {}
        for folder in Path(self.args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            step = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", folder.name)
            if step and folder.is_dir():
                found[int(step[1])] = folder
        for step in sorted(found, reverse=True):
            missing = self._missing_parts(found[step])
            if not missing:
                return str(found[step])
            log.warning(
                "skipping %s: incomplete (no %s), its save was interrupted", found[step], ", ".join(missing)
            )
        raise ValueError(
            f"resume_from_checkpoint=True: no checkpoint in {self.args.output_dir} holds both the Trainer's "
            "state and the sparse state"
        )

    def _saved_rest(self, checkpoint: Path) -> dict:
        """This rank's rest of the sparse state: its own file at the world size that wrote it, rank 0's
        at another (as the CLI's run checkpoints). Refuses a world size the checkpoint cannot resume at
        (DeepSpeed's engine checkpoint holds each rank's ZeRO partition): ``world_size_problem``."""
        saved = load_verified(checkpoint / STATE_DIR / rank_file(0))
        problem = world_size_problem(saved, self.args.world_size)
        if problem:
            raise ValueError(f"{checkpoint} {problem}")
        if saved["world_size"] == self.args.world_size and self.args.process_index != 0:
            saved = load_verified(checkpoint / STATE_DIR / rank_file(self.args.process_index))
        return saved["state"]

    def _load_sparse_state(self, checkpoint: str) -> None:
        """The engine state (checked complete in ``train``), into an engine without initial masks
        (``init_masks()`` would zero restored weights outside the *initial* masks): masks and chain
        read in this process's placement, whatever world size wrote them."""
        directory = Path(checkpoint) / STATE_DIR
        state = read_state(self._saved_rest(Path(checkpoint)), directory / SHARDED, self.sparse_backend)
        self.sparse_engine.load_state_dict(state["engine"])
        self.sparse_results = dict(state["results"])
        log.info("resumed Sup-tickets state from %s at step %d", checkpoint, self.sparse_engine.step)

    # ---- reporting ----------------------------------------------------------------------------------
    def sup_tickets_summary(self) -> dict:
        """P, each T_i, each S_i and the final model, as the CLI's ``summary.json`` reports them."""
        engine = self.sparse_engine
        if engine is None:
            raise ValueError("sup_tickets_summary(): call trainer.train() first")
        return run_summary(
            engine, self.sparse_results, skipped_steps=self.skipped_steps, world_size=self.args.world_size
        )

    def sup_tickets_table(self) -> str:
        """The CLI's markdown table (needs an ``accuracy`` metric, the default ``compute_metrics``)."""
        summary = self.sup_tickets_summary()
        missing = [k for k, r in summary["results"].items() if not {"accuracy", "loss"} <= set(r)]
        if missing:
            raise ValueError(
                f"no accuracy/loss for {missing}: pass an eval_dataset (and a compute_metrics returning "
                "'accuracy', or none for the default)"
            )
        return summary_table(summary)


__all__ = ["SparsityArguments", "SupTicketsLR", "SupTicketsTrainer", "TrainerEngine"]
