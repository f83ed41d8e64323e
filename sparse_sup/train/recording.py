"""What the reference loop records: P, each ticket, each superposition and the final model,
evaluated, logged, written to metrics.jsonl and saved as sharded tickets; the engine's hooks that
trigger it; and the end of the run (summary, final checkpoint, safetensors export)."""

from __future__ import annotations

import json
import logging

from ..checkpoint import export_safetensors
from ..checkpoint.tickets import save_model_checkpoint
from ..engine import EngineHooks, SupTicketsEngine
from ..results import final_label, run_summary
from .model_ops import evaluate_model, recalibrate_model_bn
from .setup import Prepared
from .tracking import MaskHistory, layer_densities, topology_record

log = logging.getLogger(__name__)


class Recorder:
    """Evaluates whatever the backend's model holds now and records it under a label (collective).
    ``results`` (label -> accuracy, loss, step, density) is what ``summary.json`` reports."""

    def __init__(self, prepared: Prepared, backend, metrics, world_size: int, ema=None) -> None:
        self.p, self.config, self.backend = prepared, prepared.config, backend
        self.metrics, self.world_size, self.ema = metrics, world_size, ema
        self.results: dict[str, dict] = {}

    def evaluate(self) -> dict[str, float]:
        return evaluate_model(self.backend, self.p)

    def recalibrate_bn(self, counter: int = 0) -> None:
        recalibrate_model_bn(self.backend, self.p, counter)

    def evaluate_at(self, step: int) -> None:
        """A periodic evaluation (``train.eval_every_epochs``): metrics only, not a result."""
        result = self.evaluate()
        log.info("eval at step %d: accuracy %.2f%%", step, 100 * result["accuracy"])
        self.metrics.write(event="eval", label=f"step_{step}", step=step, **result)

    def record(
        self,
        label: str,
        engine: SupTicketsEngine,
        snapshot: str | None = None,
        masks: dict | None = None,
        density: float | None = None,
    ) -> dict[str, float]:
        """Evaluate and record ``label``; with ``snapshot``, also save the model as that ticket."""
        result = self.evaluate()
        density = engine.masks.density(engine.targets) if density is None else density
        result.update(step=engine.step, density=density)
        self.results[label] = result
        log.info(
            "%s: accuracy %.2f%%, loss %.4f (step %d, density %.4f)",
            label,
            100 * result["accuracy"],
            result["loss"],
            engine.step,
            density,
        )
        self.metrics.write(event="eval", label=label, **result)
        if self.ema is not None and (label == "P" or label.startswith("T_")):  # the live trajectory
            self.record_ema(label, engine)
        if snapshot and self.config.train.save_tickets:
            masks = engine.masks.masks if masks is None else masks
            meta = {"label": label, "step": engine.step, "world_size": self.world_size, **result}
            path = self.p.run_dir / "tickets" / snapshot
            save_model_checkpoint(path, self.backend, masks, {**meta, **self.model_meta()}, replace=True)
        return result

    def record_ema(self, label: str, engine: SupTicketsEngine) -> None:
        """Evaluate the EMA beside the live model's ``label``: ``<label>_ema`` (``train.ema``)."""
        result = evaluate_model(self.backend, self.p, module=self.ema.module)
        result.update(step=engine.step, density=engine.masks.density(engine.targets))
        self.results[f"{label}_ema"] = result
        self.metrics.write(event="eval", label=f"{label}_ema", **result)
        log.info("%s_ema: accuracy %.2f%%, loss %.4f", label, 100 * result["accuracy"], result["loss"])

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

    def finish(self, engine: SupTicketsEngine, skipped: int, is_main: bool) -> dict:
        """Record the final model, save it (sharded, and whole as safetensors), write summary.json."""
        final = self.evaluate()  # a result and the summary's last row, not an "eval" event
        final.update(step=engine.step, density=engine.masks.density(engine.targets))
        self.results["final"] = final
        if self.ema is not None:
            self.record_ema("final", engine)
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
            world_size=self.world_size,
            model=self.config.model.name,
        )
        meta = {"label": label, "world_size": self.world_size, **final, **self.model_meta()}
        run_dir = self.p.run_dir
        save_model_checkpoint(run_dir / "final" / "sharded", self.backend, engine.masks.masks, meta, True)
        state = self.backend.full_state()  # whole tensors (collective): the export plain timm loads
        if is_main:
            export = {k: meta[k] for k in ("model", "num_classes", "cifar_stem", "density", "label")}
            export_safetensors(run_dir / "final" / "model.safetensors", state, export)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics.write(
            event="masks",
            label="final",
            step=engine.step,
            density=final["density"],
            layer_density=layer_densities(engine),
        )
        self.metrics.close()
        return summary


class LoopHooks(EngineHooks):
    """Records P, each ticket and each superposition; logs mask changes; tracks the ever-active
    masks (``mask_history``, set once the engine's masks exist)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.mask_history: MaskHistory | None = None

    def on_phase1_end(self, engine: SupTicketsEngine) -> None:
        self.recorder.metrics.write(
            event="masks", label="P", step=engine.step, layer_density=layer_densities(engine)
        )
        tickets = engine.plan.num_cycles > 0
        self.recorder.record("P", engine, snapshot="P" if tickets else None)  # S_0 for a later merge

    def on_ticket(self, engine: SupTicketsEngine, index: int) -> None:
        self.recorder.record(f"T_{index + 1}", engine, snapshot=f"T_{index + 1}")

    def recalibrate_bn(self, engine: SupTicketsEngine) -> None:
        self.recorder.recalibrate_bn(counter=engine.num_tickets)  # S_i: pass i draws augmentations of its own

    def on_superposed(self, engine: SupTicketsEngine, index: int) -> None:
        label = f"S_{index + 1}"
        if engine.chain.masks:  # re-pruned S
            self.recorder.record(
                label, engine, label, masks=engine.chain.masks, density=engine.chain_density()
            )
        else:  # re-prune deferred to the end: S_i is the union of the tickets' supports
            self.recorder.record(label, engine, label, masks={})

    def on_topology_update(self, engine: SupTicketsEngine, kind: str, swapped: dict[str, int]) -> None:
        record = topology_record(engine, kind, swapped, self.mask_history)  # collective (ITOP count)
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
        self.recorder.metrics.write(**record)
