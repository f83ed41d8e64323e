"""Experiment trackers through Accelerate, and the mask statistics they plot.

``train.report_to`` names Accelerate trackers (tensorboard, trackio, wandb, mlflow; null means
tensorboard when it is installed). ``MetricsWriter`` (logs.py) forwards every scalar of its records
to them; ``metrics.jsonl`` stays the tracker-free record.

``MaskHistory`` keeps the "ever active" mask of every target in the masks' own placement (local
shard under FSDP2/ZeRO-3) for the in-time over-parameterisation rate (Liu et al., ICML 2021): the
fraction of target weights that have been active at least once.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..config.errors import ConfigError

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
TENSORBOARD_DIR = "tensorboard"  # inside the run directory


def resolve_report_to(report_to: list[str] | None) -> list[str]:
    """The trackers to start: ``None`` -> tensorboard when installed; ``[none]`` -> none.
    Raises ValueError naming a tracker whose package is missing."""
    if report_to is None:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    names = list(dict.fromkeys(report_to))
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"train.report_to={report_to!r} is invalid: 'none' cannot be combined")
        return []
    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(
                f"train.report_to includes {name!r} but the {_PACKAGES[name]} package is not installed: "
                f"pip install {_PACKAGES[name]}, or leave it out of train.report_to"
            )
    return names


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"sparse/density": 0.1, ...}``: the scalar types every tracker accepts as hyperparameters."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = "null" if value is None else value
        else:
            flat[name] = str(value)
    return flat


def start_trackers(accelerator, names: list[str], run_dir: Path, project: str, config: dict) -> list[str]:
    """Start Accelerate's trackers for ``names`` (main process only writes; TensorBoard into
    ``run_dir/tensorboard``). The run directory is known only after the Accelerator is built, so the
    trackers are handed to it as instances (``log_with`` accepts them) before ``init_trackers``."""
    if not names:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    instances = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            instances.append(cls(TENSORBOARD_DIR, str(run_dir)))
        else:
            instances.append(cls(project))
    accelerator.log_with = instances
    accelerator.init_trackers(project, config=flat_config(config))
    log.info(
        "trackers: %s%s",
        ", ".join(names),
        f" ({run_dir / TENSORBOARD_DIR})" if "tensorboard" in names else "",
    )
    return names


def finish_trackers(accelerator) -> None:
    """Flush and close the trackers. Not ``accelerator.end_training()``: that also destroys the
    process group, which the end of a distributed run still needs."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()
    accelerator.trackers = []


def layer_densities(engine) -> dict[str, float]:
    """Density of every target's mask (global counts, as ``MaskState`` keeps them)."""
    counts = engine.masks.counts
    return {t.name: counts[t.name] / t.numel for t in engine.targets}


class MaskHistory:
    """The masks as of the last topology update and the ever-active masks, both in the masks' own
    placement (no gather). ``update`` is collective over ``engine.backend.shard`` (one all-reduce of
    three counts): every rank must call it. ``state_dict`` belongs in run checkpoints, so a resumed
    run keeps counting from where it stopped."""

    def __init__(self, engine) -> None:
        self.last = {name: m.detach().bool().clone() for name, m in engine.masks.masks.items()}
        self.ever = {name: m.clone() for name, m in self.last.items()}

    def update(self, engine) -> tuple[float, float]:
        """Fold in the current masks. Returns (mask change: weights active before and inactive now
        over weights active before; in-time over-parameterisation rate: weights ever active over
        all target weights)."""
        device = next(iter(self.last.values())).device if self.last else None
        counts = torch.zeros(3, dtype=torch.int64, device=device)  # left the mask, were active, ever active
        for name, mask in engine.masks.masks.items():
            mask = mask.bool()
            counts[0] += (self.last[name] & ~mask).sum()
            counts[1] += self.last[name].sum()
            self.ever[name] |= mask
            counts[2] += self.ever[name].sum()
            self.last[name].copy_(mask)
        engine.backend.shard.all_reduce_sum(counts)
        left, active, ever = counts.tolist()
        return left / max(active, 1), ever / engine.total_target_weights

    def state_dict(self) -> dict:
        return {"last": self.last, "ever": self.ever}

    def load_state_dict(self, state: dict) -> None:
        for key in ("last", "ever"):
            for name, mask in state[key].items():
                getattr(self, key)[name].copy_(mask)


def topology_record(engine, kind: str, swapped: dict[str, int], history: MaskHistory) -> dict:
    """The ``metrics.jsonl`` record of one mask change; collective (see ``MaskHistory.update``).

    ``moved``: what the update reports (weights dropped, or pruned, per layer); ``mask_change``:
    the share of previously active weights that are no longer active (a weight dropped and regrown
    at once does not count: a mask that stops changing shows as 0)."""
    mask_change, itop_rate = history.update(engine)
    return {
        "event": kind,
        "step": engine.step,
        "density": engine.masks.density(engine.targets),
        "layer_density": layer_densities(engine),
        "moved": swapped,
        "mask_change": mask_change,
        "itop_rate": itop_rate,
    }


def schedule_record(engine, max_points: int = 2000) -> dict:
    """The LR schedule as the engine computes it, for plots (the ``train`` records sample it only
    every ``log_every`` steps, too coarse for a cycle's triangle): every step of a short run, else
    ``max_points`` evenly spaced plus every breakpoint (milestones, warm-up end, cycle start/peak/end)."""
    plan = engine.plan
    total = plan.total_steps
    if total <= max_points:
        steps = list(range(total))
    else:
        points = {round(i * (total - 1) / (max_points - 1)) for i in range(max_points)}
        edges = [plan.pre_steps, plan.warmup_steps, *plan.lr_milestones]
        for m in range(plan.num_cycles):
            start = plan.pre_steps + m * plan.cycle_steps
            edges += [start, start + plan.cycle_steps // 2, start + plan.cycle_steps]
        points.update(s + d for s in edges for d in (-1, 0))
        steps = sorted(s for s in points if 0 <= s < total)
    return {
        "event": "schedule",
        "step": 0,
        "total_steps": total,
        "pre_steps": plan.pre_steps,
        "num_cycles": plan.num_cycles,
        "cycle_steps": plan.cycle_steps,
        "lr_steps": steps,
        "lr": [engine.lr(s) for s in steps],
    }
