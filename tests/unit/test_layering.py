"""The algorithm core does not pull in distributed engines or model zoos (DESIGN.md layering).

``import torch`` alone already loads parts of torch.distributed, so process-group machinery is
checked as "nothing beyond what plain torch loads" plus a source scan."""

import json
import re
import subprocess
import sys
from pathlib import Path

FRAMEWORKS = ("accelerate", "deepspeed", "transformers", "timm", "datasets")
CORE_PACKAGES = ("core", "tickets", "config", "methods")
PKG = Path(__file__).resolve().parents[2] / "sparse_sup"


def _modules_after(code: str) -> set[str]:
    script = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=PKG.parent
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_core_tickets_engine_import_no_frameworks():
    baseline = _modules_after("import torch")
    loaded = _modules_after(
        "import sparse_sup.core.select, sparse_sup.core.topology, sparse_sup.core.masks\n"
        "import sparse_sup.tickets, sparse_sup.engine, sparse_sup.config"
    )
    assert "sparse_sup.engine" in loaded and "sparse_sup.tickets.superpose" in loaded
    assert "sparse_sup.methods.granet" in loaded and "sparse_sup.timeline" in loaded
    frameworks = sorted(m for m in loaded if m.split(".")[0] in FRAMEWORKS)
    assert not frameworks, f"core/tickets/engine import {frameworks[:5]}"
    extra_distributed = sorted(m for m in loaded - baseline if m.startswith("torch.distributed"))
    assert not extra_distributed, f"core/tickets/engine load {extra_distributed[:5]}"


def test_core_sources_do_not_import_process_groups():
    files = [PKG / "engine.py"] + [f for p in CORE_PACKAGES for f in (PKG / p).rglob("*.py")]
    pattern = re.compile(
        r"^\s*(import|from)\s+(torch\.distributed|accelerate|deepspeed|transformers|timm|datasets)\b", re.M
    )
    offenders = [str(f.relative_to(PKG)) for f in files if pattern.search(f.read_text())]
    assert not offenders, f"layering violated in {offenders}"


def test_integrations_and_checkpoint_do_not_import_the_cli_training_package():
    """The Trainer and the checkpoint code share components with the CLI loop (results, backends,
    engine), never the loop itself (DESIGN.md: one arrow against the layering was removed)."""
    files = [f for p in ("integrations", "checkpoint") for f in (PKG / p).rglob("*.py")]
    pattern = re.compile(r"^\s*(from\s+(\.\.train|sparse_sup\.train)\b|import\s+sparse_sup\.train\b)", re.M)
    offenders = [str(f.relative_to(PKG)) for f in files if pattern.search(f.read_text())]
    assert not offenders, f"imports sparse_sup.train: {offenders}"
