"""Every benchmark script runs its ``--smoke`` mode end to end (so the scripts do not rot), and the
reproduction study's aggregation computes what docs/RESULTS.md claims from summary.json files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import reproduce  # noqa: E402  (bench/ is not a package)


def run_script(*args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell} ")
    ]


def positive(cell: str) -> float:
    value = float(re.match(r"[-+]?[0-9.]+", cell).group(0))
    assert value > 0, cell
    return value


def half_unit(cell: str) -> float:
    """Half a unit of the cell's last printed digit: how far rounding may have moved it."""
    number = re.match(r"[-+]?[0-9.]+", cell).group(0)
    return 0.5 * 10.0 ** -len(number.partition(".")[2])


def assert_printed_ratio(ratio: str, numerator: str, denominator: str, scale: float = 1.0) -> None:
    """The printed ratio (from unrounded times) equals scale x numerator / denominator up to the
    rounding of the three printed cells; a fixed relative tolerance fails on small rounded times."""
    num, den = positive(numerator), positive(denominator)
    hn, hd = half_unit(numerator), half_unit(denominator)
    low, high = scale * (num - hn) / (den + hd), scale * (num + hn) / (den - hd)
    value = float(ratio.rstrip("%"))
    assert low - half_unit(ratio) <= value <= high + half_unit(ratio), (ratio, numerator, denominator)


def test_throughput_smoke():
    out = run_script("bench/throughput.py", "--smoke")
    rows = table_rows(out, "test_resnet")
    assert len(rows) == 2, out  # CPU-time table and wall-time table
    for row in rows:
        assert_printed_ratio(row[3], row[2], row[1])  # dense / plain loop
        assert_printed_ratio(row[5], row[4], row[1])  # sparse / plain loop


def test_overhead_smoke():
    out = run_script("bench/overhead.py", "--smoke")
    rows = table_rows(out, "test_resnet")
    assert len(rows) == 2, out
    for row in rows:
        assert_printed_ratio(row[3], row[2], row[1])  # sparse_sup / dense
        assert_printed_ratio(row[6], row[5], row[1])  # torch.nn.utils.prune / dense
        assert_printed_ratio(row[8], row[7], row[1])  # WeightNormSparsifier / dense


def test_topology_cost_smoke():
    out = run_script("bench/topology_cost.py", "--smoke")
    rows = table_rows(out, "test_resnet")
    assert [r[1] for r in rows] == ["rigl", "set"], out
    for row in rows:
        assert_printed_ratio(row[4], row[3], row[2], scale=100 / 1000)  # % of 1000 steps


def test_gpu_throughput_smoke_on_cpu():
    out = run_script("bench/gpu_throughput.py", "--smoke")
    rows = table_rows(out, "test_resnet") + table_rows(out, "test_vit")
    assert len(rows) == 2, out
    for row in rows:
        assert_printed_ratio(row[6], row[5], row[3])


def test_gpu_throughput_loop_smoke_on_cpu():
    out = run_script("bench/gpu_throughput.py", "--loop", "--smoke")
    rows = table_rows(out, "test_resnet") + table_rows(out, "test_vit")
    assert len(rows) == 2, out
    for row in rows:
        assert_printed_ratio(row[6], row[5], row[3])  # sparse_sup dense / plain loop
        assert_printed_ratio(row[8], row[7], row[3])  # sparse_sup sparse / plain loop


def test_gpu_cifar_smoke_on_cpu(tmp_path):  # ~20 s; marked slow before, it let an import break
    out = run_script("bench/gpu_cifar.py", "--smoke", "--out", str(tmp_path))
    assert "| RigL (base, whole budget) |" in out and "| RigL + Sup-tickets |" in out, out
    summary = json.loads((tmp_path / "cycles3" / "summary.json").read_text())
    assert summary["plan"]["num_cycles"] == 3 and "S_3" in summary["results"]


@pytest.mark.slow
def test_reproduce_smoke_runs_the_cli_and_resumes(tmp_path):
    doc = tmp_path / "RESULTS.md"
    out = run_script("bench/reproduce.py", "--smoke", "--out", str(tmp_path / "runs"), "--doc", str(doc))
    assert "rigl-base-s0: " in out and "FAILED" not in out, out
    text = doc.read_text()
    assert "| rigl | paper | 1/1 |" in text and "python train.py --config configs/tiny-test.yaml" in text
    again = run_script("bench/reproduce.py", "--smoke", "--out", str(tmp_path / "runs"), "--doc", str(doc))
    assert again.count("done earlier, skipped") == 2, again


def _summary(path: Path, results: dict[str, float], cycles: int, wall: float) -> None:
    path.mkdir(parents=True)
    record = {k: {"accuracy": v, "loss": 1.0, "density": 0.1, "step": 10} for k, v in results.items()}
    summary = {"results": record, "plan": {"num_cycles": cycles}}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "wall_time.json").write_text(json.dumps({"wall_s": wall, "threads": 1}))


def test_reproduce_shows_a_linked_runs_folder_relative_to_the_repo(tmp_path):
    """A runs folder linked in from elsewhere (another worktree) is shown as runs/..., the path the
    command runs from, not the link target's absolute path."""
    link = ROOT / "runs" / f"linked-{tmp_path.name}"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(tmp_path)
    try:
        shown = reproduce._shown(link / "rigl-base-s0")
    finally:
        link.unlink()
    assert shown == f"runs/{link.name}/rigl-base-s0"


def test_reproduce_aggregation_pairs_seeds_and_keeps_notes(tmp_path):
    tier = reproduce.Tier("test tier", "configs/tiny-test.yaml", 8, {"rigl": [0, 1]}, ("base", "paper"))
    specs = reproduce.grid(tier, tmp_path)
    _summary(tmp_path / "rigl-base-s0", {"final": 0.60}, 0, 100)
    _summary(tmp_path / "rigl-base-s1", {"final": 0.64}, 0, 120)
    _summary(tmp_path / "rigl-paper-s0", {"P": 0.58, "T_1": 0.59, "final": 0.63}, 1, 110)
    _summary(tmp_path / "rigl-paper-s1", {"P": 0.60, "T_1": 0.62, "final": 0.65}, 1, 130)
    body = reproduce.aggregate("test", tier, specs, "cmd")
    # S_M 63, 65 -> 64.00 ± 1.41; base 60, 64 -> 62.00 ± 2.83; gains +3, +1 -> +2.00 ± 1.41
    assert "| rigl | paper | 2/2 | 59.00 ± 1.41 | 60.50 ± 2.12 | 64.00 ± 1.41 | 62.00 ± 2.83 " in body
    assert "| +2.00 ± 1.41 | 120 |" in body
    assert "S_M beats the base run" in body
    doc = tmp_path / "RESULTS.md"
    other = "<!-- TIER:cpu -->\nthe cpu tier's table\n<!-- /TIER:cpu -->\n"
    doc.write_text(
        f"old\n{other}<!-- TIER:test -->\nstale\n<!-- /TIER:test -->\n"
        "<!-- NOTES -->\nhand-written\n<!-- /NOTES -->\n"
    )
    reproduce.write_doc(doc, "test", body)
    text = doc.read_text()
    assert text.startswith("# Results") and "hand-written" in text and "old" not in text
    assert other in text and "stale" not in text and body in text  # other tiers kept, this one replaced


def _refusal(tmp_path, monkeypatch, capsys, *args: str) -> str:
    """Run the study's main() with ``args``; assert it stops with a usage error having written
    nothing, and return the message."""
    doc, out = tmp_path / "RESULTS.md", tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["reproduce.py", *args, "--out", str(out), "--doc", str(doc)])
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main()
    assert exit_info.value.code == 2
    assert not out.exists() and not doc.exists()
    return capsys.readouterr().err


def test_reproduce_refuses_a_tier_whose_data_folder_is_missing(tmp_path, monkeypatch, capsys):
    """The `fulltest` tier reads the full CIFAR-10 beside the repository, which is not shipped: without
    it the study stops before any run, names the folder and what to put there, and writes nothing."""
    missing = dataclasses.replace(reproduce.TIERS["fulltest"], needs="no/such/cifar10")
    monkeypatch.setitem(reproduce.TIERS, "fulltest", missing)
    error = _refusal(tmp_path, monkeypatch, capsys, "--tier", "fulltest")
    assert str(ROOT / "no/such/cifar10") in error and "test-*.parquet" in error, error


def test_reproduce_refuses_a_method_the_tier_does_not_run(tmp_path, monkeypatch, capsys):
    error = _refusal(tmp_path, monkeypatch, capsys, "--tier", "cpu", "--methods", "rigl,magnitude")
    assert "the tier cpu runs rigl, set, granet" in error, error


def test_resnet32_cifar_is_the_benchmark_model():
    import torch

    from sparse_sup.models import build_model, select_targets

    model = build_model("resnet32_cifar", 10)
    names = select_targets(model)
    params = dict(model.named_parameters())
    assert len(names) == 34  # stem, 30 block convs, 2 1x1 shortcuts, classifier
    assert sum(params[n].numel() for n in names) == 464_432
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_input_pipeline_smoke():
    """bench/input_pipeline.py: both pipelines timed, CPU cost, wall-clock and (``--recal``) BN
    recalibration tables printed."""
    out = run_script("bench/input_pipeline.py", "--smoke", "--recal")
    cost = {r[0]: r for r in table_rows(out, "sparse_sup") + table_rows(out, "timm create_loader")}
    assert set(cost) == {"sparse_sup", "timm create_loader"}
    assert all(positive(c) for r in cost.values() for c in r[1:])
    wall, recal = table_rows(out, "1")  # 1 worker: the loaders' row, then recalibration's
    assert_printed_ratio(wall[5], wall[1], wall[3])
    assert_printed_ratio(recal[3], recal[2], recal[1])


# A preset's ticket section, as different as the schema allows from every real one: a study schedule
# must override each of these keys that shapes its run, or it measures whatever the preset of the day
# says (the default job moved to a 0.02 peak, and the tiers' "paper" runs would have followed it).
PRESET_TICKETS = [
    "--tickets.schedule=tail",
    "--tickets.num_cycles=2",
    "--tickets.cycles_fraction=0.25",
    "--tickets.lr_low=0.0003",
    "--tickets.lr_high=0.07",
    "--tickets.reexplore_fraction=0.3",
]


def _study_timeline(tier, method: str, schedule: str, preset: list[str]) -> tuple:
    """Group 0's LR at every step and the mask events of one study run, from its own flags."""
    from sparse_sup.config import load_config, resolve_plan
    from sparse_sup.timeline import Timeline

    spec = reproduce.RunSpec(method, schedule, 0, Path("runs"))
    flags = spec.command(tier)[4:]  # after: python train.py --config <file>
    at = flags.index(reproduce.SCHEDULES[schedule][0])  # the preset's tickets come before the schedule's
    cfg = load_config(ROOT / tier.config, [*flags[:at], *preset, *flags[at:]])
    plan = resolve_plan(cfg, 10_000)  # the bundled training split
    timeline = Timeline.from_config(cfg, plan)
    lrs = [timeline.lr(s) for s in range(plan.total_steps)]
    return plan.num_cycles, lrs, [timeline.mask_events(s) for s in range(plan.total_steps + 1)]


@pytest.mark.parametrize("tier_name", sorted(reproduce.TIERS))
def test_reproduce_schedules_do_not_depend_on_the_presets_ticket_section(tier_name):
    """Every study run's LR at every step and its mask events are the same whatever ticket recipe its
    --config carries: the schedules name the whole recipe they study."""
    tier = reproduce.TIERS[tier_name]
    method = next(iter(tier.seeds))
    for schedule in tier.schedules:
        as_run = _study_timeline(tier, method, schedule, [])
        assert _study_timeline(tier, method, schedule, PRESET_TICKETS) == as_run, schedule
