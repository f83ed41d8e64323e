"""``sparse-sup merge``: superpose a finished run's P and tickets again, at any world size.

Reads the sharded checkpoints ``RUN_DIR/tickets/{P,T_1..T_M}`` into a model sharded by FSDP2 when
several processes run (one process: a plain model), folds them into a ``SuperpositionChain`` with
the run's rule (or an override), re-prunes by exact global top-k over the shards, recalibrates
BatchNorm on the run's data, evaluates, and writes the result as a sharded checkpoint plus a
consolidated safetensors export that plain ``timm.create_model`` loads.

Only the weights of the tickets enter S (BN statistics are recalibrated from data), so the result
equals the run's own S_M whatever the world size: masks exactly, weights to float tolerance.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..backends import build_backend
from ..checkpoint import CheckpointError, export_safetensors, read_manifest, verify_sharded
from ..checkpoint.tickets import load_model_checkpoint, save_model_checkpoint
from ..config import Config, ConfigError
from ..progress import progress
from ..tickets import SuperpositionChain
from .model_ops import evaluate_model, model_device, recalibrate_model_bn
from .setup import Prepared, place_data

log = logging.getLogger(__name__)


def ticket_dirs(run_dir: Path, which: list[int] | None) -> tuple[Path, list[Path]]:
    """P and the requested tickets T_i (default: every ticket the run saved), checked to exist."""
    tickets = Path(run_dir) / "tickets"
    found = sorted(
        (int(m.group(1)), p)
        for p in (tickets.iterdir() if tickets.is_dir() else [])
        if (m := re.fullmatch(r"T_(\d+)", p.name))
    )
    if not found:
        raise ConfigError(f"{tickets}: no tickets (T_1, T_2, ...) found; was the run made with tickets?")
    available = {i: p for i, p in found}
    chosen = which or sorted(available)
    missing = [i for i in chosen if i not in available]
    if missing:
        raise ConfigError(f"--tickets {missing}: no such ticket in {tickets} (it holds {sorted(available)})")
    return tickets / "P", [available[i] for i in chosen]


def check_tickets_match(paths: list[Path], config: Config, target_names: list[str]) -> list[dict]:
    """Every checkpoint must come from this model and these targets; returns their metadata."""
    metas = []
    for path in paths:
        problems = verify_sharded(path)  # every file's checksum, before anything is loaded
        if problems:
            raise CheckpointError(f"{problems[0]}; merge needs intact tickets")
        meta = read_manifest(path).get("meta", {})
        if meta.get("model") != config.model.name or meta.get("targets") != target_names:
            raise CheckpointError(
                f"{path} holds {meta.get('model')!r} with {len(meta.get('targets') or [])} targets; this "
                f"merge builds {config.model.name!r} with {len(target_names)}: merge tickets of one run"
            )
        metas.append(meta)
    return metas


class Merge:
    """One merge over a prepared model (built from the run's config with the user's overrides)."""

    def __init__(self, prepared: Prepared, run_dir: Path, output: Path, which: list[int] | None) -> None:
        self.p, self.run_dir, self.output = prepared, Path(run_dir), Path(output)
        self.phase1, self.tickets = ticket_dirs(run_dir, which)
        t = prepared.config.tickets
        self.sources = ([self.phase1] if t.include_phase1_model else []) + self.tickets
        self.metas = check_tickets_match(self.sources, prepared.config, prepared.target_names)

    def build(self, world_size: int) -> None:
        model = self.p.model
        if world_size > 1:  # shard: the chain and the re-prune then cost O(model / world) per rank
            from ..backends.fsdp2 import fsdp2_shard_model

            fsdp2_shard_model(model)
        self.backend = build_backend(model, None, self.p.target_names)
        self.targets = self.backend.targets()
        place_data(self.p, model_device(self.backend))

    def superpose(self) -> dict[str, torch.Tensor]:
        """S over the sources, re-pruned as the run's (or the overridden) tickets config says."""
        t, density = self.p.config.tickets, self.p.config.sparse.density
        keep = int(density * sum(x.numel for x in self.targets))  # floor(d * N), as in the run
        chain = SuperpositionChain(t.merge, t.ema_ticket_weight)
        for i, path in enumerate(progress(self.sources, desc="superpose", unit="ticket")):
            load_model_checkpoint(path, self.backend, self.p.target_names)
            chain.merge(self.backend.state_tensors())
            is_ticket = path != self.phase1
            if is_ticket and (t.reprune == "every" or i == len(self.sources) - 1):
                chain.reprune(self.targets, keep, self.backend.shard)
            log.info("merged %s (%d/%d)", path.name, i + 1, len(self.sources))
        chain.swap(self.backend.state_tensors())  # the model holds S
        self.backend.refresh_model_weights()
        return chain.masks

    def run(self) -> dict:
        c = self.p.config
        masks = self.superpose()
        if c.tickets.bn_recalibration:
            recalibrate_model_bn(self.backend, self.p, counter=len(self.tickets))  # the run's S_M pass
        result = evaluate_model(self.backend, self.p)
        kept = torch.stack([m.sum() for m in masks.values()]).sum().to(torch.int64).reshape(1)
        self.backend.shard.all_reduce_sum(kept)
        result["density"] = int(kept) / sum(x.numel for x in self.targets)
        label = f"S_{len(self.tickets)}"
        fields = ("accuracy", "loss", "density", "step")
        results = {m["label"]: {k: m.get(k) for k in fields} for m in self.metas}
        results[f"{label} (merged)"] = result
        meta = {**self.metas[-1], "label": f"{label} (merged)", "sources": [p.name for p in self.sources]}
        meta.update(accuracy=result["accuracy"], loss=result["loss"], density=result["density"])
        save_model_checkpoint(self.output / "sharded", self.backend, masks, meta)
        state = self.backend.full_state()  # whole tensors (collective): the plain-timm export
        summary = {"run": str(self.run_dir), "merged": meta["sources"], "results": results}
        if self._is_main():
            export = {k: meta.get(k) for k in ("model", "num_classes", "cifar_stem", "density", "label")}
            export_safetensors(self.output / "model.safetensors", state, export)
            (self.output / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    @staticmethod
    def _is_main() -> bool:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
