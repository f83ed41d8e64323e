"""The reference training loop: Accelerate for devices, DDP and mixed precision; the
``SupTicketsEngine`` for everything sparse; hooks for evaluation, BN recalibration and tickets."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ..backends import LocalBackend
from ..backends.buffers import sync_buffers
from ..backends.collectives import data_parallel_collectives
from ..backends.detect import accelerate_shards_model, detect_parallelism
from ..backends.fsdp2 import FSDP2Backend, fsdp2_shard_model
from ..checkpoint import export_safetensors, save_model_snapshot
from ..config import config_to_dict
from ..data import GlobalBatchSampler, make_loader
from ..engine import EngineHooks, SupTicketsEngine
from ..tickets import recalibrate_batchnorm
from .evaluate import evaluate, recalibration_batches
from .logs import MetricsWriter, setup_logging
from .optim import build_optimizer
from .progress import progress_enabled
from .setup import Prepared
from .tracking import MaskHistory, layer_densities, schedule_record, topology_record

log = logging.getLogger(__name__)


class LoopHooks(EngineHooks):
    """Evaluates P, each ticket and each superposition; saves tickets; logs mask changes."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_phase1_end(self, engine: SupTicketsEngine) -> None:
        self.run.metrics.write(
            event="masks", label="P", step=engine.step, layer_density=layer_densities(engine)
        )
        self.run.record("P", engine)

    def on_ticket(self, engine: SupTicketsEngine, index: int) -> None:
        self.run.record(f"T_{index + 1}", engine, snapshot=f"ticket_{index + 1}.pt")

    def recalibrate_bn(self, engine: SupTicketsEngine) -> None:
        self.run.recalibrate_bn(counter=engine.num_tickets)  # S_i: pass i draws augmentations of its own

    def on_superposed(self, engine: SupTicketsEngine, index: int) -> None:
        if engine.chain.masks:  # re-pruned S
            self.run.record(
                f"S_{index + 1}",
                engine,
                snapshot=f"superposed_{index + 1}.pt",
                masks=engine.chain.masks,
                density=engine.chain_density(),
            )
        else:  # re-prune deferred to the end: S_i is the union of the tickets' supports
            self.run.record(f"S_{index + 1}", engine, snapshot=f"superposed_{index + 1}.pt")

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
        self.dp = data_parallel_collectives()
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if self.is_main else None)

    # ---- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        c = self.config
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(c), sort_keys=False))
        setup_logging(self.accelerator.process_index, self.run_dir / "train.log")
        log.info("run directory: %s", self.run_dir)
        log.info("plan: %s", self.p.plan.describe())
        self.parallelism = detect_parallelism(self.accelerator, self.p.deepspeed_config is not None)
        log.info("parallelism: %s over %d process(es)", self.parallelism, self.accelerator.num_processes)
        model = self.p.model
        if self.p.deepspeed_config is not None:  # the deepspeed launcher: DeepSpeed wraps the model
            import deepspeed

            self.model, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=build_optimizer(model, c.optim), config=self.p.deepspeed_config
            )
        elif self.parallelism == "fsdp2" and not accelerate_shards_model(self.accelerator):
            fsdp2_shard_model(model)  # Accelerate ignores its FSDP plugin on CPU: shard here
            self.model, self.optimizer = model, self.accelerator.prepare(build_optimizer(model, c.optim))
        else:
            if c.train.compile:
                model = torch.compile(model)
            self.model, self.optimizer = self.accelerator.prepare(model, build_optimizer(model, c.optim))
        self.module = (
            getattr(self.model, "module", self.model)
            if self.parallelism == "deepspeed"
            else (self.accelerator.unwrap_model(self.model))
        )
        if self.parallelism == "deepspeed":
            from ..backends.deepspeed import DeepSpeedBackend

            self.backend = DeepSpeedBackend(self.model, self.p.target_names)
        elif self.parallelism == "fsdp2":
            self.backend = FSDP2Backend(self.model, self.optimizer, self.p.target_names)
        else:
            self.backend = LocalBackend(self.model, self.optimizer, self.p.target_names, self.dp)
        self.engine = SupTicketsEngine.from_config(c, self.p.plan, self.backend, LoopHooks(self))
        if self.parallelism == "deepspeed":
            self.backend.wrap_optimizer_step(self.engine)  # the real step may run inside backward()
        self.engine.init_masks()
        counts = self.engine.masks.counts
        log.info(
            "layer densities: %s",
            ", ".join(f"{t.name}={counts[t.name] / t.numel:.3f}" for t in self.engine.targets),
        )
        self.mask_history = MaskHistory(self.engine)  # ever-active masks: in-time over-parameterisation
        self.metrics.start_trackers(
            self.accelerator, c.train.report_to, self.run_dir, c.experiment.name, config_to_dict(c)
        )
        self.metrics.write(
            event="masks",
            label="init",
            step=0,
            density=self.engine.masks.density(self.engine.targets),
            layer_density=layer_densities(self.engine),
        )
        self.metrics.write(**schedule_record(self.engine))

    # ---- evaluation, BN, snapshots ------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def lockstep(self) -> bool:
        """FSDP2 forwards are collective: every rank must run the same number of them."""
        zero3 = self.parallelism == "deepspeed" and self.backend.stage == 3
        return self.parallelism == "fsdp2" or zero3

    def evaluate(self) -> dict[str, float]:
        d = self.config.data
        sync_buffers(self.module, self.dp)  # BN buffers identical on every rank before evaluating
        return evaluate(
            self.module,
            self.p.eval_set,
            d.eval_batch_size,
            self.dp,
            self.accelerator.device,
            d.num_workers,
            lockstep=self.lockstep,
        )

    def recalibrate_bn(self, counter: int = 0) -> None:
        t, d = self.config.tickets, self.config.data
        batches = recalibration_batches(
            self.p.bn_set,
            d.eval_batch_size,
            t.bn_recal_batches,
            self.config.experiment.seed,
            self.dp,
            self.accelerator.device,
            self.dtype,
            lockstep=self.lockstep,
            counter=counter,
        )
        recalibrate_batchnorm(self.module, batches, self.dp)

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
        if snapshot and self.config.train.save_tickets:
            state = self.model_state()
            full_masks = self.backend.full_masks(masks if masks is not None else engine.masks.masks)
            if self.is_main:
                save_model_snapshot(
                    self.run_dir / "tickets" / snapshot,
                    state,
                    full_masks,
                    {"label": label, "step": engine.step, **result},
                )

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
        loader = make_loader(self.p.train_set, sampler, c.data.num_workers)
        last_step = min(plan.total_steps, c.train.max_steps or plan.total_steps)
        bar = tqdm(
            total=last_step,
            disable=not progress_enabled(),  # rank 0, train.progress_bar, stdout a terminal
            unit="step",
            dynamic_ncols=True,
        )
        window_loss, window_n, window_start, skipped = 0.0, 0, time.perf_counter(), 0
        self.model.train()
        while engine.step < last_step:
            epoch, offset = divmod(engine.step, plan.steps_per_epoch)
            sampler.set_epoch(epoch, offset)
            micro = iter(loader)
            for _ in range(offset, plan.steps_per_epoch):
                loss = self._optimizer_step(micro, accum)
                if loss is None:
                    skipped += 1
                    continue
                window_loss, window_n = window_loss + loss, window_n + 1
                bar.update(1)
                phase, cycle = engine.phase(engine.step - 1)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    lr=f"{engine.lr(engine.step - 1):.2e}",
                    phase=phase if cycle is None else f"cycle {cycle + 1}",
                )
                if engine.step % c.train.log_every == 0 or engine.step == last_step:
                    rate = window_n / (time.perf_counter() - window_start)
                    log.info(
                        "step %d/%d epoch %d %s | loss %.4f | lr %.2e | density %.4f | %.2f steps/s%s",
                        engine.step,
                        last_step,
                        epoch,
                        phase if cycle is None else f"cycle {cycle + 1}",
                        window_loss / window_n,
                        engine.lr(engine.step - 1),
                        engine.masks.density(engine.targets),
                        rate,
                        f" | {skipped} skipped" if skipped else "",
                    )
                    self.metrics.write(
                        event="train",
                        step=engine.step,
                        epoch=epoch,
                        loss=window_loss / window_n,
                        lr=engine.lr(engine.step - 1),
                        phase=phase,
                        cycle=cycle,
                        density=engine.masks.density(engine.targets),
                        steps_per_s=rate,
                    )
                    window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
                if (
                    c.train.eval_every_epochs
                    and engine.step % max(1, round(c.train.eval_every_epochs * plan.steps_per_epoch)) == 0
                ):
                    r = self.evaluate()
                    log.info("eval at step %d: accuracy %.2f%%", engine.step, 100 * r["accuracy"])
                    self.metrics.write(event="eval", label=f"step_{engine.step}", step=engine.step, **r)
                if engine.step >= last_step:
                    break
        bar.close()
        return self.finish(skipped)

    def _deepspeed_step(self, micro, accum: int) -> float | None:
        """DeepSpeed runs the sparse engine inside its own optimizer step (see DeepSpeedBackend);
        with Accelerate's plugin that step happens inside ``accelerator.backward``."""
        ds, total = self.model, 0.0
        for _ in range(accum):
            images, labels = next(micro)
            images, labels = images.to(ds.device), labels.to(ds.device)
            loss = F.cross_entropy(
                ds(images).float(), labels, label_smoothing=self.config.optim.label_smoothing
            )
            if self.p.deepspeed_config is not None:
                ds.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
                ds.step()
            else:
                self.accelerator.backward(loss)
            total += loss.item() / accum
        if not ds.was_step_applied():
            log.warning("DeepSpeed skipped the optimizer step (overflow); no schedule advanced")
            return None
        return total

    def _optimizer_step(self, micro, accum: int) -> float | None:
        """One real optimizer step over ``accum`` micro-batches; None if it was skipped."""
        if self.parallelism == "deepspeed":
            return self._deepspeed_step(micro, accum)
        c, acc, engine = self.config, self.accelerator, self.engine
        for g in self.optimizer.param_groups:
            g["lr"] = engine.lr()
        total = 0.0
        for a in range(accum):
            images, labels = next(micro)
            images, labels = images.to(acc.device), labels.to(acc.device)
            sync = a == accum - 1
            if self.parallelism == "fsdp2":
                self.model.set_requires_gradient_sync(sync)
            no_sync = not sync and self.parallelism == "ddp"
            with acc.no_sync(self.model) if no_sync else nullcontext():
                with acc.autocast():
                    logits = self.model(images)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=c.optim.label_smoothing)
                acc.backward(loss / accum)
            total += loss.item() / accum
        if acc.scaler is not None:
            acc.unscale_gradients(self.optimizer)
        engine.before_optimizer_step()
        finite = True
        params = [p for p in self.model.parameters() if p.grad is not None]
        if c.optim.max_grad_norm:
            norm = acc.clip_grad_norm_(params, c.optim.max_grad_norm)
            finite = bool(torch.isfinite(torch.as_tensor(norm)))
        elif c.train.skip_nonfinite:
            norms = torch._foreach_norm([p.grad for p in params])
            finite = bool(torch.isfinite(torch.stack(norms)).all())
        step_skipped = not finite and c.train.skip_nonfinite
        if not step_skipped:
            self.optimizer.step()
            step_skipped = acc.optimizer_step_was_skipped
        engine.after_optimizer_step(skipped=step_skipped)
        self.optimizer.zero_grad(set_to_none=True)
        if step_skipped:
            log.warning("optimizer step skipped (non-finite gradients); no schedule advanced")
            return None
        return total

    # ---- the end -------------------------------------------------------------------------------
    def finish(self, skipped: int) -> dict:
        engine = self.engine
        final = self.evaluate()
        final.update(step=engine.step, density=engine.masks.density(engine.targets))
        self.results["final"] = final
        label = f"S_{engine.num_tickets}" if engine.num_tickets else "final (no tickets)"
        log.info(
            "final model (%s): accuracy %.2f%%, density %.4f",
            label,
            100 * final["accuracy"],
            final["density"],
        )
        summary = {
            "results": self.results,
            "final_is": label,
            "plan": {
                "total_steps": self.p.plan.total_steps,
                "pre_steps": self.p.plan.pre_steps,
                "num_cycles": self.p.plan.num_cycles,
                "cycle_steps": self.p.plan.cycle_steps,
                "cycles_fraction": self.p.plan.cycles_fraction,
            },
            "steps_completed": engine.step,
            "skipped_steps": skipped,
            "model": self.config.model.name,
            "method": self.config.sparse.method,
            "density": self.config.sparse.density,
            "world_size": self.accelerator.num_processes,
            "parallelism": self.parallelism,
        }
        state = self.model_state()
        full_masks = self.backend.full_masks(engine.masks.masks)
        if self.is_main:
            meta = {
                "model": self.config.model.name,
                "num_classes": self.config.model.num_classes,
                "cifar_stem": self.config.model.cifar_stem,
                "density": final["density"],
            }
            export_safetensors(self.run_dir / "final" / "model.safetensors", state, meta)
            save_model_snapshot(
                self.run_dir / "final" / "model_and_masks.pt", state, full_masks, {"label": label, **final}
            )
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


def summary_table(summary: dict) -> str:
    """Markdown table: P, each ticket, each superposition and the final model."""
    rows = ["| model | accuracy | loss | density | step |", "|---|---|---|---|---|"]
    for label, r in summary["results"].items():
        name = f"final = {summary['final_is']}" if label == "final" else label
        rows.append(
            f"| {name} | {100 * r['accuracy']:.2f}% | {r['loss']:.4f} | {r['density']:.4f} | {r['step']} |"
        )
    return "\n".join(rows)
