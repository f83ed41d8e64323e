"""The command line as a user runs it: a real (tiny) training run end to end, and bad input that
stops before training with a clear message and leaves an existing run directory untouched."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_sup.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-test.yaml")


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def existing_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("experiment: {name: earlier}\n")
    (run / "summary.json").write_text('{"precious": true}\n')
    return run


@pytest.mark.parametrize(
    "override, message",
    [
        ("--sparse.density=0", "sparse.density"),
        ("--sparse.density=1.5", "sparse.density"),
        ("--sparse.method=magic", "sparse.method"),
        ("--tickets.num_cycles=40", "tickets.num_cycles"),
        ("--model.name=resnet_does_not_exist", "resnet_does_not_exist"),
        ("--data.source=/no/such/folder", "/no/such/folder"),
        ("--sparse.densty=0.1", "did you mean 'density'"),
        ("--schedule.epochs=ten", "schedule.epochs"),
    ],
)
def test_bad_config_stops_early_and_keeps_run_dir(existing_run, capsys, override, message):
    before = _tree_digest(existing_run)
    code = main(
        ["--config", TINY, f"--experiment.output_dir={existing_run}", "--experiment.overwrite=true", override]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert _tree_digest(existing_run) == before


def test_existing_run_dir_is_refused_without_overwrite(existing_run, capsys):
    before = _tree_digest(existing_run)
    assert main(["--config", TINY, f"--experiment.output_dir={existing_run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _tree_digest(existing_run) == before


def test_train_py_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", TINY, f"--experiment.output_dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("| P |", "| T_1 |", "| T_2 |", "| S_2 |", "| final = S_2 |"):
        assert label in proc.stdout, proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    results = summary["results"]
    assert set(results) == {"P", "T_1", "S_1", "T_2", "S_2", "final"}
    assert all(r["count"] == 300 for r in results.values())  # every eval example counted once
    assert results["final"]["accuracy"] == results["S_2"]["accuracy"]
    for label in ("P", "T_2", "S_2"):
        assert results[label]["accuracy"] > 0.12, results  # chance is 0.10
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
    for name in ("P", "T_1", "S_1", "T_2", "S_2"):  # sharded checkpoints, each with its manifest
        assert (run_dir / "tickets" / name / "manifest.json").exists(), name

    # the exported final model loads into a plain timm model and is exactly at the final density
    import timm
    from safetensors.torch import load_file

    from sparse_sup.models import select_targets

    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict(load_file(str(run_dir / "final" / "model.safetensors")), strict=True)
    names = select_targets(model)
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    kept = sum(int((params[n] != 0).sum()) for n in names)
    assert kept <= math.floor(0.1 * total)
    from sparse_sup.checkpoint import load_sharded

    masks = {n: load_sharded(run_dir / "final" / "sharded", {n: (0, params[n].numel())})[n][1] for n in names}
    assert sum(int(m.sum()) for m in masks.values()) == math.floor(0.1 * total)
