"""The command line as a user runs it: a real (tiny) training run end to end, and bad input that
stops before training with a clear message and leaves an existing run directory untouched."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_tail_schedules_end_to_end(tmp_path):
    """tickets.schedule=tail: the run follows the base run's LR at every step,
    never re-explores, and reports tickets taken from the tail, each at exact density.
    tickets.schedule=tail_cycles: phase 1 is the base run itself (the same LR and loss at every step,
    bit for bit), then the paper's triangle."""
    runs = {}
    schedules = {
        "base": ["--tickets.num_cycles=0"],
        "tail": ["--tickets.schedule=tail"],
        "tail_cycles": ["--tickets.schedule=tail_cycles"],
    }
    for name, flags in schedules.items():
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "train.py", "--config", TINY, *flags, "--train.log_every=1",
             "--sparse.check_invariants=true", f"--experiment.output_dir={out}"],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (proc.stdout, records, json.loads((out / "summary.json").read_text()))
    stdout, records, summary = runs["tail"]
    assert "2 tickets from the last 25% of the base schedule (tail)" in stdout
    assert summary["plan"]["ticket_schedule"] == "tail"
    lrs = {name: [r["lr"] for r in rec if r["event"] == "train"] for name, (_, rec, _) in runs.items()}
    assert lrs["tail"] == lrs["base"] and len(lrs["tail"]) == 48
    assert not [r for r in records if r.get("kind") == "reexplore" or r["event"] == "reexplore"]
    assert set(summary["results"]) == {"P", "T_1", "S_1", "T_2", "S_2", "final"}
    assert all(abs(r["density"] - 0.1) < 1e-5 for r in summary["results"].values())

    stdout, records, summary = runs["tail_cycles"]
    assert (
        "2 tickets (25% of the budget in cycles, after the base run's own LR schedule (tail_cycles))"
        in stdout
    )
    train = {
        name: [(r["lr"], r["loss"]) for r in rec if r["event"] == "train"]
        for name, (_, rec, _) in runs.items()
    }
    assert train["tail_cycles"][:36] == train["base"][:36]
    assert max(lr for lr, _ in train["tail_cycles"][36:]) == pytest.approx(5e-3)
    assert not [r for r in records if r.get("kind") == "reexplore" or r["event"] == "reexplore"]
    assert all(abs(r["density"] - 0.1) < 1e-5 for r in summary["results"].values())


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


# --- bad input: one line naming the key or file and the fix, exit 2, nothing written -----------------


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("base: " + TINY + "\nexperiment:\n  name: bad\n\tseed: 1\n")  # a tab on line 4
    return path


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config", "{bad_yaml}"], ["bad.yaml", "line 4, column 1", "YAML syntax error"]),
        (
            ["--schedule.grad_accum_steps=3"],
            ["schedule.grad_accum_steps=3", "divisor of schedule.batch_size=64"],
        ),
        (["--schedule.epochs=.inf"], ["schedule.epochs=inf", "finite"]),
        (["--optim.lr=.nan"], ["optim.lr=nan", "finite"]),
        (["--model.kwargs={img_size:32}"], ["model.kwargs", "{img_size: 32"]),
        (["--sparse.density=[0.1"], ["--sparse.density=[0.1", "YAML syntax error"]),
        (["--tickets.ema_decay=0.3"], ["tickets.ema_decay was renamed to tickets.ema_ticket_weight"]),
        (["--config", "no-such-preset"], ["'no-such-preset'", "presets:", "debug-cpu"]),
        (["--data.mean=[0.5, 0.5, 0.5]"], ["data.std", "together"]),
        (["--sparse.include=[nosuch.*]"], ["sparse.include pattern 'nosuch.*' matches no parameter"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, bad_yaml, args, fragments):
    run_dir = tmp_path / "never"
    args = [a.replace("{bad_yaml}", str(bad_yaml)) for a in args]
    if "--config" not in args:
        args = ["--config", TINY, *args]
    code = main([*args, f"--experiment.output_dir={run_dir}"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    for fragment in fragments:
        assert fragment in line, line
    assert not run_dir.exists()


def _train_py(args: list[str], launcher: list[str] | None = None, timeout: int = 600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [*(launcher or [sys.executable]), "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_deepspeed_without_launcher_runs_as_one_process_and_reports_bad_input(tmp_path):
    """``python train.py --deepspeed X`` sets up a 1-process job itself (no MPI lookup); bad input
    found after DeepSpeed's process group exists is still one line, exit 2, nothing written."""
    run_dir = tmp_path / "never"
    proc = _train_py(
        [
            "--deepspeed",
            "launch/deepspeed/zero2.json",
            "--config",
            TINY,
            "--model.name=resnet_nope",
            f"--experiment.output_dir={run_dir}",
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "resnet_nope" in _one_error_line(proc.stderr)
    assert "running DeepSpeed as 1 process" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_deepspeed_without_launcher_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = _train_py(
        [
            "--deepspeed",
            "launch/deepspeed/zero2.json",
            "--config",
            TINY,
            "--schedule.epochs=3",
            f"--experiment.output_dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parallelism"] == "deepspeed" and summary["world_size"] == 1
    assert summary["results"]["S_2"]["density"] == pytest.approx(0.1, abs=1e-4)


@pytest.mark.parametrize("bad", ["--sparse.density=2", "--model.name=resnet_nope"])
def test_config_error_under_deepspeed_launcher_is_printed_once(tmp_path, bad):
    """Found while loading the config (before any process group) or in preparation (after)."""
    run_dir = tmp_path / "never"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"]
    args = [
        "--deepspeed",
        "launch/deepspeed/zero2.json",
        "--config",
        TINY,
        bad,
        f"--experiment.output_dir={run_dir}",
    ]
    proc = _train_py(args, launcher)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count("error: ") == 1, output[-3000:]
    assert bad.split("=")[1] in output
    assert not run_dir.exists()


def test_wheel_ships_the_presets(tmp_path):
    """A non-editable install finds ``--config debug-cpu`` (and presets that name a ``base:``)."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("sparse_sup", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("sparse_sup-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    presets = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("sparse_sup/configs/")) == presets
    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=600
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    for preset in ("debug-cpu", "tiny-test"):
        proc = subprocess.run(
            [sys.executable, "-m", "sparse_sup", "--config", preset, "--print-config"],
            cwd=tmp_path,  # not the repository: only the installed package can answer
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"name: {preset}" in proc.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import sparse_sup; print(sparse_sup.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(target)), where
