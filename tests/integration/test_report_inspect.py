"""What a run leaves for its user, read back with the users' own tools: TensorBoard event files
through TensorBoard's reader, PNGs through PIL, report.md, and ``sparse-sup inspect`` on a healthy
run and on a ticket with one corrupted byte."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_sup.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-test.yaml")
# 4 epochs of 8 steps: phase 1 = 24 steps (updates every 4), then 2 cycles of 4 steps
RUN_ARGS = ["--config", TINY, "--schedule.epochs=4", "--train.log_every=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One real tiny run through ``python -m sparse_sup train`` (the module entry point)."""
    out = tmp_path_factory.mktemp("observed") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_sup", "train", *RUN_ARGS, f"--experiment.output_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_run(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _records(run_dir)
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layers = next(r for r in records if r["event"] == "masks")["layer_density"]
    expected = {
        "train/loss",
        "train/lr",
        "train/phase",
        "train/cycle",
        "density/overall",
        "topology/update_mask_change",
        "topology/reexplore_mask_change",
        "topology/itop_rate",
        "tickets/P/accuracy",
        "tickets/T/accuracy",
        "tickets/S/accuracy",
    } | {f"density/{name}" for name in layers}
    assert expected <= tags, sorted(expected - tags)

    train = [r for r in records if r["event"] == "train"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train] == list(range(4, 33, 4))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    phase = {e.step: e.value for e in acc.Scalars("train/phase")}
    cycle = {e.step: e.value for e in acc.Scalars("train/cycle")}
    assert phase[24] == 1 and phase[28] == 2 and phase[32] == 2  # step 24 closes phase 1
    assert cycle[24] == 0 and cycle[28] == 1 and cycle[32] == 2

    # one point per ticket and per superposition, at the step it was taken
    assert [e.step for e in acc.Scalars("tickets/P/accuracy")] == [24]
    assert [e.step for e in acc.Scalars("tickets/T/accuracy")] == [28, 32]
    assert [e.step for e in acc.Scalars("tickets/S/accuracy")] == [28, 32]
    summary = json.loads((run_dir / "summary.json").read_text())["results"]
    assert acc.Scalars("tickets/S/accuracy")[-1].value == pytest.approx(summary["S_2"]["accuracy"])

    # exploration: one point per topology update (5 in phase 1, a re-exploration per cycle start)
    updates = [r for r in records if r["event"] in ("update", "reexplore")]
    itop = acc.Scalars("topology/itop_rate")
    assert [e.step for e in itop] == [r["step"] for r in updates] == [4, 8, 12, 16, 20, 24, 28]
    rates = [e.value for e in itop]
    assert all(b >= a for a, b in zip(rates, rates[1:])), rates  # ever-active only grows
    assert 0.1 < rates[0] < rates[-1] <= 1.0
    changes = [e.value for e in acc.Scalars("topology/update_mask_change")]
    assert len(changes) == 5 and all(0 < c <= 0.5 for c in changes), changes  # drop fraction 0.5
    # at the first update every weight that entered the mask is new: ever active = active + entered
    initial = next(r for r in records if r["event"] == "masks")["density"]
    assert rates[0] == pytest.approx(initial * (1 + changes[0]), rel=1e-5)


def test_pngs_load_with_expected_sizes(run_dir):
    from PIL import Image

    sizes = {
        "lr.png": (1100, 450),
        "loss_accuracy.png": (1100, 700),
        "layer_density.png": (1100, 600),
        "exploration.png": (1100, 700),
    }
    for name, size in sizes.items():
        with Image.open(run_dir / "plots" / name) as image:
            image.load()
            assert image.size == size, name
            assert len(set(image.convert("L").getdata())) > 20, f"{name} looks blank"


def test_report_md_has_table_plots_command_and_config(run_dir):
    report = (run_dir / "report.md").read_text()
    for text in ("## Results", "| T_1 |", "| S_2 |", "| final = S_2 |", "## Checks", "## Plots"):
        assert text in report, text
    for name in ("lr", "loss_accuracy", "layer_density", "exploration"):
        assert f"](plots/{name}.png)" in report and (run_dir / "plots" / f"{name}.png").is_file()
    assert f"python -m sparse_sup train --config {TINY} --schedule.epochs=4" in report
    assert "## Config (resolved)" in report and "report_to:" in report


def test_plot_command_redraws(run_dir, tmp_path, capsys):
    assert main(["plot", str(run_dir), "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["exploration.png", "layer_density.png", "loss_accuracy.png", "lr.png"]
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_inspect_healthy_run_dir(run_dir, capsys):
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "run directory" in out and "test_resnet" in out and "all files intact" in out
    for label in ("P", "T_1", "S_1", "T_2", "S_2"):
        assert f"  {label}  " in out, out

    assert main(["inspect", str(run_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "run directory" and d["step"] == 32 and d["world_size"] == 1 and d["phase"] == "done"
    assert d["problems"] == [] and len(d["children"]) >= 6
    assert all(f["ok"] for c in d["children"] for f in c["files"])
    labels = [c["label"] for c in d["children"]]
    assert {"P", "T_1", "S_1", "T_2", "S_2"} <= set(labels)
    ticket = next(c for c in d["children"] if c["label"] == "T_2")
    assert ticket["step"] == 32 and ticket["cycle"] == 2
    assert ticket["density"] == pytest.approx(0.1, abs=1e-3)
    assert len(ticket["layer_density"]) == 16


def _ticket(run_dir: Path, label: str) -> Path:
    found = [p for p in (run_dir / "tickets").iterdir() if p.name in (label, f"ticket_{label[2:]}.pt")]
    assert len(found) == 1, list((run_dir / "tickets").iterdir())
    return found[0]


def _flip_one_byte(path: Path) -> Path:
    """Flip a byte in the middle of the ticket's largest data file; returns that file."""
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.name != "manifest.json"]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return target


def test_inspect_names_a_corrupted_ticket_file(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ticket = _ticket(copy, "T_1")
    damaged = _flip_one_byte(ticket)

    assert main(["inspect", str(ticket)]) == 1
    captured = capsys.readouterr()
    assert str(damaged) in captured.err and "SHA-256" in captured.err, captured.err

    assert main(["inspect", str(copy), "--json"]) == 1  # the run directory as a whole
    d = json.loads(capsys.readouterr().out)
    assert any(str(damaged) in p for p in d["problems"]) and len(d["problems"]) == 1
    healthy = next(c for c in d["children"] if c["label"] == "T_2")
    assert all(f["ok"] for f in healthy["files"])


def test_inspect_refuses_unknown_paths(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert "not something sparse_sup wrote" in capsys.readouterr().err
