"""Logging set-up: rank-0 console, a per-run log file, and a JSON-lines metrics file."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch


class _RankZeroFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int, log_file: Path | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger("sparse_sup")
    root.setLevel(level)
    root.handlers.clear()
    root.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    console.addFilter(_RankZeroFilter(rank))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)


class MetricsWriter:
    """The one sink of run metrics: appends one JSON object per event to ``metrics.jsonl`` (rank 0
    only) and forwards its scalars to the Accelerate trackers started by ``start_trackers``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.accelerator = None

    def start_trackers(
        self, accelerator, report_to: list[str] | None, run_dir: Path, project: str, config: dict
    ):
        """Start the trackers ``train.report_to`` names (main process; a no-op elsewhere)."""
        from .tracking import resolve_report_to, start_trackers

        if self.path is None or not accelerator.is_main_process:
            return
        if start_trackers(accelerator, resolve_report_to(report_to), run_dir, project, config):
            self.accelerator = accelerator

    def write(self, **record: object) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None:
            scalars = tracker_scalars(record)
            if scalars:
                self.accelerator.log(scalars, step=int(record.get("step") or 0))

    def close(self) -> None:
        """Flush and close the trackers (metrics.jsonl is closed after every record)."""
        if self.accelerator is not None:
            from .tracking import finish_trackers

            finish_trackers(self.accelerator)
            self.accelerator = None


class LossWindow:
    """The training loss since the last log step, summed on the device: no host read until
    ``close``, so the steps in between never wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def drop(self, steps: int) -> None:
        """Deferred steps that the device skipped (they added a loss of 0) leave the mean."""
        self.steps -= steps

    def close(self) -> tuple[float, float]:
        """(mean loss, optimizer steps per second) since the last close (one host read)."""
        mean = float(self.loss) / self.steps
        rate = self.steps / (time.perf_counter() - self.start)
        self.loss.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return mean, rate


def _label_series(label: str) -> str | None:
    """P -> "P", T_3 -> "T", S_2 -> "S", final -> "final"; periodic evaluations -> None."""
    head = label.split("_", 1)[0]
    return head if head in ("P", "T", "S") or label == "final" else None


def tracker_scalars(record: dict) -> dict[str, float]:
    """Tracker tags of one ``metrics.jsonl`` record (TensorBoard groups by the part before '/')."""
    event = record.get("event")
    out: dict[str, float] = {}
    if event == "train":
        out["train/loss"] = record["loss"]
        out["train/lr"] = record["lr"]
        out["train/phase"] = 1.0 if record["phase"] == "dst" else 2.0
        out["train/cycle"] = 0.0 if record.get("cycle") is None else record["cycle"] + 1.0
        out["density/overall"] = record["density"]
        if "steps_per_s" in record:
            out["train/steps_per_s"] = record["steps_per_s"]
    elif event == "eval":
        series = _label_series(str(record["label"]))
        group = "eval" if series is None else f"tickets/{series}"
        out[f"{group}/accuracy"] = record["accuracy"]
        out[f"{group}/loss"] = record["loss"]
    elif event in ("update", "reexplore", "prune"):
        out["density/overall"] = record["density"]
        out.update({f"density/{name}": d for name, d in record.get("layer_density", {}).items()})
        out[f"topology/{event}_mask_change"] = record["mask_change"]
        if "itop_rate" in record:
            out["topology/itop_rate"] = record["itop_rate"]
    elif event == "masks":
        out.update({f"density/{name}": d for name, d in record.get("layer_density", {}).items()})
        if "density" in record:
            out["density/overall"] = record["density"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run replays them), so metrics.jsonl continues
    instead of restarting or holding the replayed steps twice."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
