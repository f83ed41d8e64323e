"""What a run directory says about its run: ``metrics.jsonl``, ``summary.json``, ``config.yaml``."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
_TICKET = re.compile(r"^([TS])_(\d+)$")


@dataclass
class RunData:
    run_dir: Path
    records: list[dict]
    summary: dict | None = None
    config: dict = field(default_factory=dict)

    def events(self, *kinds: str) -> list[dict]:
        return [r for r in self.records if r.get("event") in kinds]

    @property
    def schedule(self) -> dict | None:
        found = self.events("schedule")
        return found[-1] if found else None

    @property
    def pre_steps(self) -> int | None:
        """Steps of phase 1 (P is taken after them)."""
        if self.schedule:
            return self.schedule["pre_steps"]
        if self.summary:
            return self.summary["plan"]["pre_steps"]
        return None

    def cycles(self) -> list[tuple[int, int]]:
        """[start, end) of every cycle in steps."""
        s = self.schedule or (self.summary or {}).get("plan")
        if not s or not s.get("num_cycles"):
            return []
        return [
            (s["pre_steps"] + m * s["cycle_steps"], s["pre_steps"] + (m + 1) * s["cycle_steps"])
            for m in range(s["num_cycles"])
        ]

    def evals(self) -> dict[str, dict]:
        """Evaluation records by label (P, T_i, S_i, final, step_N); the last one of a label wins."""
        return {r["label"]: r for r in self.events("eval")}

    def tickets(self, kind: str) -> list[tuple[int, dict]]:
        """(i, record) of every T_i (kind "T") or S_i (kind "S"), in order."""
        found = []
        for label, r in self.evals().items():
            m = _TICKET.match(label)
            if m and m.group(1) == kind:
                found.append((int(m.group(2)), r))
        return sorted(found, key=lambda x: x[0])

    def masks(self, label: str) -> dict[str, float] | None:
        """Per-layer densities recorded at ``init``, ``P`` or ``final``."""
        found = [r for r in self.events("masks") if r.get("label") == label]
        return found[-1]["layer_density"] if found else None

    @property
    def name(self) -> str:
        return self.config.get("experiment", {}).get("name") or self.run_dir.name


def load_run(run_dir: str | Path) -> RunData:
    """Raises FileNotFoundError (with the path) when ``run_dir`` holds no ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a run directory?")
    records = []
    lines = metrics.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # a run killed mid-write leaves a partial last line
                log.warning("%s:%d is cut short; ignoring it", metrics, n)
                continue
            raise ValueError(f"{metrics}:{n} is not valid JSON ({e.msg})") from None
    summary_file, config_file = run_dir / "summary.json", run_dir / "config.yaml"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return RunData(run_dir, records, summary, config or {})
