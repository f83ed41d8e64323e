"""The reference training loop: Accelerate for devices, DDP and mixed precision; the
``SupTicketsEngine`` for everything sparse; hooks for evaluation, BN recalibration and tickets."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..backends import StepOptions, build_backend
from ..backends.local import unwrap_module
from ..checkpoint import export_safetensors
from ..checkpoint.run_state import load_run_checkpoint, save_run_checkpoint
from ..checkpoint.state_pieces import parameter_layouts, read_state, split_state
from ..checkpoint.tickets import save_model_checkpoint
from ..config import config_to_dict
from ..data import GlobalBatchSampler
from ..engine import EngineHooks, SupTicketsEngine
from ..progress import progress_enabled
from ..results import final_label, run_summary
from .ema import build_ema, record_ema
from .logs import MetricsWriter, setup_logging, truncate_metrics
from .model_ops import evaluate_model, recalibrate_model_bn
from .setup import Prepared
from .tracking import MaskHistory, layer_densities, schedule_record, topology_record
from .wrap import wrap_model

log = logging.getLogger(__name__)


class LoopHooks(EngineHooks):
    """Evaluates P, each ticket and each superposition; saves tickets; logs mask changes."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_phase1_end(self, engine: SupTicketsEngine) -> None:
        self.run.metrics.write(
            event="masks", label="P", step=engine.step, layer_density=layer_densities(engine)
        )
        tickets = engine.plan.num_cycles > 0
        self.run.record("P", engine, snapshot="P" if tickets else None)  # S_0 for a later merge

    def on_ticket(self, engine: SupTicketsEngine, index: int) -> None:
        self.run.record(f"T_{index + 1}", engine, snapshot=f"T_{index + 1}")

    def recalibrate_bn(self, engine: SupTicketsEngine) -> None:
        self.run.recalibrate_bn(counter=engine.num_tickets)  # S_i: pass i draws augmentations of its own

    def on_superposed(self, engine: SupTicketsEngine, index: int) -> None:
        if engine.chain.masks:  # re-pruned S
            self.run.record(
                f"S_{index + 1}",
                engine,
                snapshot=f"S_{index + 1}",
                masks=engine.chain.masks,
                density=engine.chain_density(),
            )
        else:  # re-prune deferred to the end: S_i is the union of the tickets' supports
            self.run.record(f"S_{index + 1}", engine, snapshot=f"S_{index + 1}", masks={})

    def on_topology_update(self, engine: SupTicketsEngine, kind: str, swapped: dict[str, int]) -> None:
        record = topology_record(engine, kind, swapped, self.run.mask_history)  # collective (ITOP count)
        per_layer = record["layer_density"]
        log.info(
            "step %d %s: density %.4f (layers %.3f..%.3f), %d moved, mask changed %.1f%%, ever active %.1f%%",
            engine.step,
            kind,
            record["density"],
            min(per_layer.values()),
            max(per_layer.values()),
            sum(swapped.values()),
            100 * record["mask_change"],
            100 * record["itop_rate"],
        )
        self.run.metrics.write(**record)


class Run:
    def __init__(self, prepared: Prepared, accelerator) -> None:
        self.p = prepared
        self.config = prepared.config
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.run_dir = prepared.run_dir
        self.results: dict[str, dict] = {}
        self.skipped = 0  # optimizer steps skipped (overflow, non-finite gradients)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if self.is_main else None)

    # ---- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        c = self.config
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # a resumed run keeps its config.yaml
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(c), sort_keys=False))
        setup_logging(self.accelerator.process_index, self.run_dir / "train.log")
        log.info("run directory: %s", self.run_dir)
        log.info("plan: %s", self.p.plan.describe())
        self.model, self.optimizer = wrap_model(self.p, self.accelerator)
        self.device = next(unwrap_module(self.model).parameters()).device
        self.autocast, backward = self.accelerator.autocast, self.accelerator.backward
        self.scaler = self.accelerator.scaler  # the loss scaler, if any (its state joins checkpoints)
        if c.train.precision == "fp16" and self.scaler is None and self.device.type == "cpu":
            # Accelerate runs neither fp16 autocast nor a GradScaler on the CPU, so fp16 would silently
            # be fp32: run both here (the same scaler semantics as on a GPU, overflows included)
            self.scaler = torch.amp.GradScaler("cpu")
            self.autocast = lambda: torch.autocast("cpu", dtype=torch.float16)
            backward = lambda loss: self.scaler.scale(loss).backward()
        options = StepOptions(
            max_grad_norm=c.optim.max_grad_norm,
            skip_nonfinite=c.train.skip_nonfinite,
            backward=backward,
            scaler=self.scaler,
        )
        self.backend = build_backend(self.model, self.optimizer, self.p.target_names, options)
        if getattr(self.backend, "casts_forward", False):  # FSDP2's MixedPrecisionPolicy casts itself
            self.autocast = contextlib.nullcontext
        self.channels_last = c.train.channels_last
        self.module = self.backend.module
        log.info("parallelism: %s over %d process(es)", self.backend.kind, self.accelerator.num_processes)
        self.engine = SupTicketsEngine.from_config(c, self.p.plan, self.backend, LoopHooks(self))
        self.engine.init_masks()
        self.ema = build_ema(c.train, self.backend, self.engine.masks.masks)  # train.ema (ema.py)
        counts = self.engine.masks.counts
        log.info(
            "layer densities: %s",
            ", ".join(f"{t.name}={counts[t.name] / t.numel:.3f}" for t in self.engine.targets),
        )
        self.mask_history = MaskHistory(self.engine)  # ever-active masks: in-time over-parameterisation
        if self.p.resume_from is not None:
            self.resume(self.p.resume_from)
        elif self.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", 0)  # --resume auto before any checkpoint
        self.metrics.start_trackers(
            self.accelerator, c.train.report_to, self.run_dir, c.experiment.name, config_to_dict(c)
        )
        if self.engine.step > 0:
            return
        self.metrics.write(
            event="masks",
            label="init",
            step=0,
            density=self.engine.masks.density(self.engine.targets),
            layer_density=layer_densities(self.engine),
        )
        self.metrics.write(**schedule_record(self.engine))

    # ---- run checkpoints -----------------------------------------------------------------------
    def checkpoint_due(self, step: int | None = None) -> bool:
        ck, engine = self.config.checkpoint, self.engine
        step = engine.step if step is None else step
        periodic = ck.every_steps is not None and step % ck.every_steps == 0
        event = step == self.p.plan.pre_steps or engine.phases.cycle_end(step) is not None
        return periodic or (ck.at_cycle_ends and event)

    def _host_step(self, step: int, last_step: int) -> bool:
        """Whether completing optimizer step ``step`` makes the host act: log, evaluate, checkpoint,
        stop, or an engine event (mask update, phase or cycle boundary, the end). Such a step and the
        steps before it must be known exactly, so it is never deferred (see ``train``)."""
        c, plan, engine = self.config, self.p.plan, self.engine
        eval_every = c.train.eval_every_epochs
        return (
            step % c.train.log_every == 0
            or step >= last_step
            or (eval_every and step % max(1, round(eval_every * plan.steps_per_epoch)) == 0)
            or self.checkpoint_due(step)
            or engine.acts_after(step)
        )

    def _next_host_step(self, last_step: int) -> int:
        """The first step after the engine's (exact) step at which the host acts."""
        step = self.engine.step + 1
        while not self._host_step(step, last_step):
            step += 1
        return step

    def save_checkpoint(self) -> None:
        """Collective: model + optimizer (the engine's format) and this rank's sparse state.

        Saving changes nothing the run computes next (the result must not depend on
        ``checkpoint.every_steps``): each rank's BN buffers, which differ between ranks (each tracks
        its own micro-batches; DDP broadcasts rank 0's at the next forward, FSDP2 never does), go
        into its own state file as they are, rather than being averaged in place before the save."""
        state = {
            "engine": self.engine.state_dict(),
            "mask_history": self.mask_history.state_dict(),
            "loop": {"results": self.results, "skipped": self.skipped},
            "buffers": {n: b.detach().clone() for n, b in self.module.named_buffers()},
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": torch.get_rng_state(),
            # dropout / drop-path draw from the device's generator when the model is on a GPU
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
        }
        pieces, rest = split_state(state, parameter_layouts(self.backend))
        path = save_run_checkpoint(
            self.run_dir, self.engine.step, self.backend, rest, self.config.checkpoint.keep_last, pieces
        )
        log.info("checkpoint written: %s", path)
        self.metrics.write(event="checkpoint", step=self.engine.step, path=str(path))

    def resume(self, path: Path) -> None:
        """Continue exactly where the checkpoint left off: bit-identical at the world size that
        wrote it; at another one (one process, DDP, FSDP2) masks, chain and mask history are read
        in the new placement, and only float reduction order differs (BatchNorm models: also the
        per-rank batch statistics, which depend on the world size in any run)."""
        rest, sharded = load_run_checkpoint(path, self.backend)
        self.engine.rebind()  # the engine's own load may have replaced tensors (DeepSpeed)
        state = read_state(rest, sharded, self.backend)
        self.engine.load_state_dict(state["engine"])
        self.backend.refresh_model_weights()
        self.mask_history.load_state_dict(state["mask_history"])
        self.results, self.skipped = state["loop"]["results"], state["loop"]["skipped"]
        with torch.no_grad():  # this rank's own buffers (rank 0's at another world size)
            for name, buffer in self.module.named_buffers():
                buffer.copy_(state["buffers"][name])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        if self.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.engine.step)
        log.info("resumed from %s at step %d", path, self.engine.step)

    # ---- evaluation, BN, snapshots ------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return evaluate_model(self.backend, self.p)

    def recalibrate_bn(self, counter: int = 0) -> None:
        recalibrate_model_bn(self.backend, self.p, counter)

    def model_state(self) -> dict[str, torch.Tensor]:
        """Whole tensors (collective under FSDP2: every rank must call it)."""
        return self.backend.full_state()

    def record(
        self,
        label: str,
        engine: SupTicketsEngine,
        snapshot: str | None = None,
        masks: dict | None = None,
        density: float | None = None,
    ) -> None:
        result = self.evaluate()
        result.update(
            step=engine.step, density=engine.masks.density(engine.targets) if density is None else density
        )
        self.results[label] = result
        log.info(
            "%s: accuracy %.2f%%, loss %.4f (step %d, density %.4f)",
            label,
            100 * result["accuracy"],
            result["loss"],
            engine.step,
            result["density"],
        )
        self.metrics.write(event="eval", label=label, **result)
        if self.ema is not None and (label == "P" or label.startswith("T_")):  # the live trajectory
            record_ema(self, label)
        if snapshot and self.config.train.save_tickets:
            masks = engine.masks.masks if masks is None else masks
            meta = {"label": label, "step": engine.step, "world_size": self.accelerator.num_processes}
            meta.update(result)
            path = self.run_dir / "tickets" / snapshot
            save_model_checkpoint(path, self.backend, masks, {**meta, **self.model_meta()}, replace=True)

    def model_meta(self) -> dict:
        """What a checkpoint reader needs to rebuild the model and check that tickets belong together."""
        c = self.config
        return {
            "model": c.model.name,
            "num_classes": c.model.num_classes,
            "cifar_stem": c.model.cifar_stem,
            "model_kwargs": c.model.kwargs,
            "target_density": c.sparse.density,
            "targets": self.p.target_names,
        }

    # ---- training ------------------------------------------------------------------------------
    def train(self) -> dict:
        c, plan, engine = self.config, self.p.plan, self.engine
        acc = self.accelerator
        accum = c.schedule.grad_accum_steps
        sampler = GlobalBatchSampler(
            len(self.p.train_set),
            c.schedule.batch_size,
            acc.num_processes,
            acc.process_index,
            accum,
            c.experiment.seed,
        )
        loader = self.p.train_input.loader(sampler, c.data.num_workers)  # uint8 batches, pinned
        last_step = min(plan.total_steps, c.train.max_steps or plan.total_steps)
        bar = tqdm(
            total=last_step,
            disable=not progress_enabled(),  # rank 0, train.progress_bar, stdout a terminal
            unit="step",
            dynamic_ncols=True,
        )
        # Host syncs: none between log steps. The loss window sums on the device; a step whose
        # completion cannot make the host act (``_host_step``) is *deferred*: where the optimizer
        # skips on the device (fused, ``found_inf``), a non-finite step is skipped there, counted
        # as taken by the host, and corrected by ``resolve_skips`` (one read) before the next step
        # that can make the host act. The steps in between do nothing that depends on the count
        # (their LR is read on the device at the true step), so the run is the same as with a
        # read after every step: same skipped steps, same data position, same schedule.
        window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        window_n, window_start, unresolved = 0, time.perf_counter(), 0
        next_host_step = self._next_host_step(last_step)
        bar.update(engine.step)
        self.model.train()
        while engine.step < last_step:
            # a skipped step consumed its batch too: the data position counts every step taken
            epoch, offset = divmod(engine.step + self.skipped, plan.steps_per_epoch)
            sampler.set_epoch(epoch, offset)
            micro = iter(loader)
            for _ in range(offset, plan.steps_per_epoch):
                defer = engine.step + 1 < next_host_step
                if not defer and unresolved:
                    skipped = self._resolve_skips()
                    window_n, unresolved = window_n - skipped, 0
                    bar.update(-skipped)
                    defer = engine.step + 1 < next_host_step  # the exact step may be further off
                loss = self._optimizer_step(micro, accum, defer)
                if loss is None:
                    self.skipped += 1
                    continue
                window_loss += loss
                window_n, unresolved = window_n + 1, unresolved + defer
                bar.update(1)
                if self.ema is not None:  # after the step's mask work: EMA kept inside the masks
                    self.ema.update(self.module, engine.masks.masks)
                if not defer:
                    next_host_step = self._next_host_step(last_step)
                if engine.step % c.train.log_every == 0 or engine.step == last_step:
                    phase, cycle = engine.phase(engine.step - 1)
                    mean_loss = float(window_loss) / window_n
                    bar.set_postfix(
                        loss=f"{mean_loss:.3f}",
                        lr=f"{engine.lr(engine.step - 1):.2e}",
                        phase=phase if cycle is None else f"cycle {cycle + 1}",
                    )
                    rate = window_n / (time.perf_counter() - window_start)
                    log.info(
                        "step %d/%d epoch %d %s | loss %.4f | lr %.2e | density %.4f | %.2f steps/s%s",
                        engine.step,
                        last_step,
                        epoch,
                        phase if cycle is None else f"cycle {cycle + 1}",
                        mean_loss,
                        engine.lr(engine.step - 1),
                        engine.masks.density(engine.targets),
                        rate,
                        f" | {self.skipped} skipped" if self.skipped else "",
                    )
                    self.metrics.write(
                        event="train",
                        step=engine.step,
                        epoch=epoch,
                        loss=mean_loss,
                        lr=engine.lr(engine.step - 1),
                        phase=phase,
                        cycle=cycle,
                        density=engine.masks.density(engine.targets),
                        steps_per_s=rate,
                    )
                    window_loss.zero_()
                    window_n, window_start = 0, time.perf_counter()
                if (
                    c.train.eval_every_epochs
                    and engine.step % max(1, round(c.train.eval_every_epochs * plan.steps_per_epoch)) == 0
                ):
                    r = self.evaluate()
                    log.info("eval at step %d: accuracy %.2f%%", engine.step, 100 * r["accuracy"])
                    self.metrics.write(event="eval", label=f"step_{engine.step}", step=engine.step, **r)
                if self.checkpoint_due():
                    self.save_checkpoint()
                if engine.step >= last_step:
                    break
        self._resolve_skips()  # none pending: the last step is never deferred
        bar.close()
        return self.finish(self.skipped)

    def _resolve_skips(self) -> int:
        """Move the deferred steps the device skipped from the engine's step count to ``skipped``
        (one host read)."""
        skipped = self.backend.resolve_skips()
        if skipped:
            self.engine.step -= skipped  # they ran no event: deferred steps never complete one
            self.skipped += skipped
            log.warning(
                "%d optimizer step(s) before step %d skipped on the device (non-finite gradients or "
                "overflow); no schedule advanced",
                skipped,
                self.engine.step + 1,
            )
        return skipped

    def _optimizer_step(self, micro, accum: int, defer: bool = False) -> torch.Tensor | None:
        """One real optimizer step over ``accum`` micro-batches, for every engine: the backend says
        how gradients synchronise and where the step happens. Returns the mean loss on the device
        (0 where a deferred step was skipped on the device), None if the host knows it was skipped."""
        backend, data = self.backend, self.p.train_input
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        inject = self.engine.step + self.skipped in self.config.train.nonfinite_steps
        for a in range(accum):
            # on the device: crop/flip, normalise, erase, mixup (keyed by the data position)
            position = self.engine.step + self.skipped
            images, labels = data.to_device(next(micro), self.device, backend.input_dtype, position)
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with backend.gradient_sync(a == accum - 1):
                with self.autocast():
                    logits = backend.model(images)
                loss = data.loss(logits, labels)
                if inject:  # fault injection (tests): every gradient of this step becomes inf
                    loss = loss * float("inf")
                backend.backward(loss, accum)
            total += loss.detach().double() / accum
        if not backend.optimizer_step(defer=defer):
            log.warning("optimizer step skipped (non-finite gradients or overflow); no schedule advanced")
            return None
        skip = backend.last_skip
        return total if skip is None else torch.where(skip, torch.zeros_like(total), total)

    # ---- the end -------------------------------------------------------------------------------
    def finish(self, skipped: int) -> dict:
        engine = self.engine
        final = self.evaluate()
        final.update(step=engine.step, density=engine.masks.density(engine.targets))
        self.results["final"] = final
        if self.ema is not None:
            record_ema(self, "final")
        label = final_label(engine)  # S_M, or the training model where train.max_steps stopped it
        log.info(
            "final model (%s): accuracy %.2f%%, density %.4f",
            label,
            100 * final["accuracy"],
            final["density"],
        )
        summary = run_summary(
            engine,
            self.results,
            skipped_steps=skipped,
            world_size=self.accelerator.num_processes,
            model=self.config.model.name,
        )
        meta = {"label": label, "world_size": self.accelerator.num_processes, **final, **self.model_meta()}
        save_model_checkpoint(
            self.run_dir / "final" / "sharded", self.backend, engine.masks.masks, meta, True
        )
        state = self.model_state()  # whole tensors (collective): the export plain timm loads
        if self.is_main:
            export = {k: meta[k] for k in ("model", "num_classes", "cifar_stem", "density", "label")}
            export_safetensors(self.run_dir / "final" / "model.safetensors", state, export)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics.write(
            event="masks",
            label="final",
            step=engine.step,
            density=final["density"],
            layer_density=layer_densities(engine),
        )
        self.metrics.close()
        return summary
