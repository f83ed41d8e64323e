"""The reference training loop: Accelerate for devices, DDP and mixed precision; the
``SupTicketsEngine`` for everything sparse; its collaborators for the rest: the step
(``step.py``), what is recorded (``recording.py``) and run checkpoints (``checkpointing.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from ..config import config_to_dict
from ..data import GlobalBatchSampler
from ..engine import SupTicketsEngine
from ..progress import progress_enabled
from .checkpointing import ModuleBuffers, RngState, RunCheckpointer
from .ema import build_ema
from .logs import LossWindow, MetricsWriter, setup_logging, truncate_metrics
from .recording import LoopHooks, Recorder
from .setup import Prepared, place_data
from .step import HostSteps, OptimizerStep, build_step_backend
from .tracking import MaskHistory, layer_densities, schedule_record
from .wrap import wrap_model

log = logging.getLogger(__name__)


class Run:
    """One training run of ``python train.py``: ``start`` builds it (or resumes it), ``train``
    runs it to the end and returns the summary."""

    def __init__(self, prepared: Prepared, accelerator) -> None:
        self.p = prepared
        self.config = prepared.config
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.run_dir = prepared.run_dir
        self.skipped = 0  # optimizer steps skipped (overflow, non-finite gradients)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if self.is_main else None)

    # ---- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        c, acc = self.config, self.accelerator
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # a resumed run keeps its config.yaml
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(c), sort_keys=False))
        setup_logging(acc.process_index, self.run_dir / "train.log")
        log.info("run directory: %s", self.run_dir)
        log.info("plan: %s", self.p.plan.describe())
        self.model, optimizer = wrap_model(self.p, acc)
        self.backend, autocast, scaler = build_step_backend(self.p, acc, self.model, optimizer)
        self.module = self.backend.module
        self.device = next(self.module.parameters()).device
        place_data(self.p, self.device)
        self.optimizer_step = OptimizerStep(self.backend, self.p.train_input, autocast, self.device, c.train)
        log.info("parallelism: %s over %d process(es)", self.backend.kind, acc.num_processes)
        self.recorder = Recorder(self.p, self.backend, self.metrics, acc.num_processes)
        hooks = LoopHooks(self.recorder)
        self.engine = SupTicketsEngine.from_config(c, self.p.plan, self.backend, hooks)
        self.engine.init_masks()
        self.ema = self.recorder.ema = build_ema(c.train, self.backend, self.engine.masks.masks)
        counts = self.engine.masks.counts
        log.info(
            "layer densities: %s",
            ", ".join(f"{t.name}={counts[t.name] / t.numel:.3f}" for t in self.engine.targets),
        )
        # ever-active masks: in-time over-parameterisation
        self.mask_history = hooks.mask_history = MaskHistory(self.engine)
        states = {
            "engine": self.engine,
            "mask_history": self.mask_history,
            "loop": self,
            "buffers": ModuleBuffers(self.module),
            "scaler": scaler,
            "ema": self.ema,
            "rng": RngState(self.device),
        }
        states = {name: state for name, state in states.items() if state is not None}
        self.checkpointer = RunCheckpointer(self.run_dir, c, self.p.plan, self.backend, states, self.metrics)
        if self.p.resume_from is not None:
            self.resume(self.p.resume_from)
        elif self.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", 0)  # --resume auto before any checkpoint
        self.metrics.start_trackers(
            acc, c.train.report_to, self.run_dir, c.experiment.name, config_to_dict(c)
        )
        if self.engine.step == 0:
            masks = self.engine.masks
            self.metrics.write(
                event="masks",
                label="init",
                step=0,
                density=masks.density(self.engine.targets),
                layer_density=layer_densities(self.engine),
            )
            self.metrics.write(**schedule_record(self.engine))

    # ---- the loop's own state (Stateful: part of run checkpoints) ----------------------------
    def state_dict(self) -> dict:
        return {"results": self.recorder.results, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.recorder.results, self.skipped = state["results"], state["skipped"]

    def resume(self, path: Path) -> None:
        self.checkpointer.load(path)
        if self.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.engine.step)

    # ---- training ------------------------------------------------------------------------------
    def train(self) -> dict:
        c, plan, engine, acc = self.config, self.p.plan, self.engine, self.accelerator
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
        # rank 0, train.progress_bar, stdout a terminal
        bar = tqdm(total=last_step, disable=not progress_enabled(), unit="step", dynamic_ncols=True)
        # Host syncs: none between log steps. The loss window sums on the device; a step whose
        # completion cannot make the host act (``HostSteps``) is *deferred*: where the optimizer
        # skips on the device (fused, ``found_inf``), a non-finite step is skipped there, counted
        # as taken by the host, and corrected by ``resolve_skips`` (one read) before the next step
        # that can make the host act. The steps in between do nothing that depends on the count
        # (their LR is read on the device at the true step), so the run is the same as with a
        # read after every step: same skipped steps, same data position, same schedule.
        host = HostSteps(c, plan, engine, last_step, self.checkpointer.due)
        window, unresolved, next_host_step = LossWindow(self.device), 0, host.next()
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
                    skipped, unresolved = self.resolve_skips(), 0
                    window.drop(skipped)
                    bar.update(-skipped)
                    defer = engine.step + 1 < next_host_step  # the exact step may be further off
                loss = self.optimizer_step(micro, accum, engine.step + self.skipped, defer)
                if loss is None:
                    self.skipped += 1
                    continue
                window.add(loss)
                unresolved += defer
                bar.update(1)
                if self.ema is not None:  # after the step's mask work: EMA kept inside the masks
                    self.ema.update(self.module, engine.masks.masks)
                if not defer:
                    next_host_step = host.next()
                if host.logs(engine.step):
                    self.log_progress(window, epoch, last_step, bar)
                if host.evaluates(engine.step):
                    self.recorder.evaluate_at(engine.step)
                if self.checkpointer.due(engine.step):
                    self.checkpointer.save()
                if engine.step >= last_step:
                    break
        self.resolve_skips()  # none pending: the last step is never deferred
        bar.close()
        return self.recorder.finish(engine, self.skipped, self.is_main)

    def resolve_skips(self) -> int:
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

    def log_progress(self, window: LossWindow, epoch: int, last_step: int, bar) -> None:
        """The log line, metrics.jsonl's ``train`` record and the bar, at a log step."""
        engine = self.engine
        mean_loss, rate = window.close()
        phase, cycle = engine.phase(engine.step - 1)
        where = phase if cycle is None else f"cycle {cycle + 1}"
        lr, density = engine.lr(engine.step - 1), engine.masks.density(engine.targets)
        bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", phase=where)
        log.info(
            "step %d/%d epoch %d %s | loss %.4f | lr %.2e | density %.4f | %.2f steps/s%s",
            engine.step,
            last_step,
            epoch,
            where,
            mean_loss,
            lr,
            density,
            rate,
            f" | {self.skipped} skipped" if self.skipped else "",
        )
        self.metrics.write(
            event="train",
            step=engine.step,
            epoch=epoch,
            loss=mean_loss,
            lr=lr,
            phase=phase,
            cycle=cycle,
            density=density,
            steps_per_s=rate,
        )
