"""The observability pieces on their own: command routing, tracker selection and tags, mask change
and in-time over-parameterisation against masks counted by hand, progress bars' quiet rules, and
the inspect readers on whole-tensor ticket files and safetensors exports."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparse_sup import progress
from sparse_sup.backends import LocalBackend
from sparse_sup.checkpoint import export_safetensors, save_model_snapshot
from sparse_sup.cli import _route, main
from sparse_sup.config import load_config, resolve_plan
from sparse_sup.engine import EngineHooks, SupTicketsEngine
from sparse_sup.report.describe import describe
from sparse_sup.train.logs import tracker_scalars
from sparse_sup.train.tracking import MaskHistory, resolve_report_to, topology_record

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-test.yaml")
COMMANDS = {"train": None, "inspect": None, "plot": None}


# ---- command line -------------------------------------------------------------------------------
def test_route_defaults_to_train_and_moves_launcher_flags():
    assert _route(["--config", "x.yaml"], COMMANDS) == ["train", "--config", "x.yaml"]
    assert _route([], COMMANDS) == ["train"]
    assert _route(["inspect", "runs/a"], COMMANDS) == ["inspect", "runs/a"]
    # the deepspeed launcher puts --local_rank=N before the script's own arguments
    assert _route(["--local_rank=1", "train", "--config", "x"], COMMANDS) == [
        "train",
        "--local_rank=1",
        "--config",
        "x",
    ]
    assert _route(["--local_rank=0", "--config", "x"], COMMANDS) == [
        "train",
        "--local_rank=0",
        "--config",
        "x",
    ]
    assert _route(["--help"], COMMANDS) == ["--help"]


@pytest.mark.parametrize("prefix", [[], ["train"], ["--local_rank=0"]])
def test_print_config_with_and_without_command(prefix, capsys):
    assert main([*prefix, "--config", TINY, "--print-config", "--train.report_to=none"]) == 0
    out = capsys.readouterr().out
    assert "name: tiny-test" in out and "report_to:\n  - none" in out


@pytest.mark.parametrize(
    "command, option", [("train", "--print-config"), ("inspect", "--json"), ("plot", "--out")]
)
def test_each_command_help_lists_its_options(command, option, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and option in capsys.readouterr().out


def test_bare_help_lists_commands_and_train_py_help_lists_training_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "inspect" in out and "plot" in out and "--print-config" not in out
    with pytest.raises(SystemExit):
        main(["--help"], default="train")  # what python train.py --help runs
    assert "--print-config" in capsys.readouterr().out


def test_bad_arguments_name_the_problem(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", TINY, "--bogus"])
    assert e.value.code == 2 and "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2 and "path" in capsys.readouterr().err


# ---- trackers -------------------------------------------------------------------------------------
def test_report_to_resolution_and_validation():
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert resolve_report_to(None) == (["tensorboard"] if tensorboard else [])
    assert resolve_report_to(["none"]) == []
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        resolve_report_to(["none", "tensorboard"])
    missing = [n for n in ("trackio", "wandb", "mlflow") if importlib.util.find_spec(n) is None]
    for name in missing:
        with pytest.raises(ValueError, match=f"pip install {name}"):
            resolve_report_to([name])
    assert load_config(None, ["--train.report_to=wandb"]).train.report_to == ["wandb"]
    with pytest.raises(ValueError, match="train.report_to"):
        load_config(None, ["--train.report_to=[tensorbord]"])


def test_tracker_tags_of_each_record():
    train = {
        "event": "train",
        "step": 8,
        "loss": 2.0,
        "lr": 0.1,
        "phase": "cycle",
        "cycle": 1,
        "density": 0.1,
    }
    assert tracker_scalars(train) == {
        "train/loss": 2.0,
        "train/lr": 0.1,
        "train/phase": 2.0,
        "train/cycle": 2.0,
        "density/overall": 0.1,
    }
    evals = [("P", "tickets/P"), ("T_3", "tickets/T"), ("S_2", "tickets/S"), ("step_40", "eval")]
    for label, group in evals:
        record = {"event": "eval", "label": label, "accuracy": 0.5, "loss": 1.5, "step": 4, "count": 10}
        assert tracker_scalars(record) == {f"{group}/accuracy": 0.5, f"{group}/loss": 1.5}
    update = {
        "event": "reexplore",
        "step": 4,
        "density": 0.1,
        "layer_density": {"fc.weight": 0.2},
        "moved": {"fc.weight": 3},
        "mask_change": 0.25,
        "itop_rate": 0.3,
    }
    assert tracker_scalars(update) == {
        "density/overall": 0.1,
        "density/fc.weight": 0.2,
        "topology/reexplore_mask_change": 0.25,
        "topology/itop_rate": 0.3,
    }
    assert tracker_scalars({"event": "schedule", "step": 0, "lr": [0.1]}) == {}


# ---- mask change and in-time over-parameterisation -------------------------------------------------
class Recorder(EngineHooks):
    """Records through ``topology_record`` and counts the same quantities by hand."""

    def __init__(self) -> None:
        self.history: MaskHistory | None = None
        self.records: list[dict] = []
        self.expected: list[tuple[float, float]] = []
        self.prev: dict[str, torch.Tensor] = {}
        self.union: dict[str, torch.Tensor] = {}

    def start(self, engine) -> None:
        self.history = MaskHistory(engine)
        self.prev = {n: m.clone() for n, m in engine.masks.masks.items()}
        self.union = {n: m.clone() for n, m in engine.masks.masks.items()}

    def on_topology_update(self, engine, kind, swapped) -> None:
        self.records.append(topology_record(engine, kind, swapped, self.history))
        now = engine.masks.masks
        left = sum(int((self.prev[n] & ~now[n]).sum()) for n in now)
        active = sum(int(self.prev[n].sum()) for n in now)
        for n in now:
            self.union[n] |= now[n]
        ever = sum(int(u.sum()) for u in self.union.values())
        self.expected.append((left / active, ever / engine.total_target_weights))
        self.prev = {n: m.clone() for n, m in now.items()}


@pytest.mark.usefixtures("one_thread")
def test_mask_change_and_itop_rate_match_hand_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = load_config(
        None,
        [
            "--sparse.method=set",
            "--sparse.density=0.2",
            "--sparse.update_interval=3",
            "--schedule.epochs=6",
            "--schedule.batch_size=32",
            "--tickets.num_cycles=1",
            "--tickets.cycle_epochs=1",
            "--tickets.cycles_fraction=null",
        ],
    )
    hooks = Recorder()
    engine = SupTicketsEngine.from_config(
        cfg, resolve_plan(cfg, 160), LocalBackend(model, opt, ["0.weight", "2.weight"]), hooks
    )
    engine.init_masks()
    hooks.start(engine)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(160, 10, generator=g).double(), torch.randint(0, 5, (160,), generator=g)
    while engine.step < engine.plan.total_steps:
        i = (engine.step * 32) % 160
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        engine.before_optimizer_step()
        opt.step()
        engine.after_optimizer_step()
    kinds = [r["event"] for r in hooks.records]
    assert kinds.count("update") >= 5 and "reexplore" in kinds
    got = [(r["mask_change"], r["itop_rate"]) for r in hooks.records]
    assert got == hooks.expected  # the same integer counts, divided the same way
    assert all(0 < change <= 0.5 for change, _ in got[:-1])  # SET drops half, regrows elsewhere
    rates = [rate for _, rate in got]
    assert rates == sorted(rates) and 0.2 < rates[0] < rates[-1] <= 1
    json.dumps(hooks.records)  # records are plain JSON


# ---- progress bars ----------------------------------------------------------------------------------
def test_progress_bars_are_quiet_unless_rank0_terminal_and_enabled(monkeypatch):
    try:
        progress.configure(False)
        assert progress.progress(range(3)).disable
        progress.configure(True)
        assert not sys.stdout.isatty() and progress.progress(range(3)).disable  # pytest captures stdout
        leader, follower = os.openpty()
        with os.fdopen(follower, "w") as tty:
            monkeypatch.setattr(sys, "stdout", tty)
            assert progress.progress_enabled()  # rank 0 (no launcher), enabled, stdout a terminal
            progress.configure(False)
            assert not progress.progress_enabled()
            progress._enabled = None  # not configured: rank from the launcher's environment
            monkeypatch.setenv("RANK", "1")
            assert not progress.progress_enabled()
            monkeypatch.setenv("RANK", "0")
            assert progress.progress_enabled()
        os.close(leader)
    finally:
        progress._enabled = None


# ---- inspect readers for single files ---------------------------------------------------------------
def _model_state() -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    masks = {"0.weight": torch.rand(8, 3, 3, 3) < 0.25, "2.weight": torch.ones(4, 8, dtype=torch.bool)}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mask in masks.items():
        state[name] *= mask
    return state, masks


def test_inspect_torch_ticket_file(tmp_path, capsys):
    state, masks = _model_state()
    path = tmp_path / "ticket_1.pt"
    save_model_snapshot(path, state, masks, {"label": "T_1", "step": 40})
    d = describe(path)
    assert d["kind"] == "ticket file" and d["problems"] == []
    assert d["label"] == "T_1" and d["step"] == 40 and d["cycle"] == 1
    assert d["layer_density"]["0.weight"] == pytest.approx(float(masks["0.weight"].float().mean()))
    assert d["layer_density"]["2.weight"] == 1.0
    total = sum(int(m.sum()) for m in masks.values())
    assert d["density"] == pytest.approx(total / sum(m.numel() for m in masks.values()))

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "corrupt" in err
    (tmp_path / "ticket_1.pt.sha256").unlink()
    assert "no checksum file" in describe(path)["problems"][0]


def test_inspect_safetensors_export(tmp_path):
    state, masks = _model_state()
    path = tmp_path / "model.safetensors"
    export_safetensors(path, state, {"model": "toy", "density": 0.3})
    d = describe(path)
    assert d["kind"] == "safetensors export" and d["model"] == "toy" and d["problems"] == []
    nonzero = float((state["0.weight"] != 0).float().mean())
    assert d["layer_density"]["0.weight"] == pytest.approx(nonzero)
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    d = describe(path)
    assert d["problems"] and str(path) in d["problems"][0]


# --- the report says whether the superposition helped ---------------------------------------
@pytest.mark.parametrize(
    ("accuracies", "expected"),
    [
        (
            {"P": 0.50, "T_1": 0.52, "T_2": 0.51, "S_2": 0.53},
            "+3.00 points against P and +1.00 against the best ticket T_1: the superposition helped; "
            "one accuracy on 2000 test images has a standard error of 1.12",
        ),
        ({"P": 0.50, "T_1": 0.52, "T_2": 0.51, "S_2": 0.515}, "lost accuracy against the best ticket T_1"),
        ({"P": 0.55, "T_1": 0.52, "T_2": 0.51, "S_2": 0.53}, "lost accuracy against P"),
    ],
)
def test_report_says_whether_the_superposition_helped(tmp_path, accuracies, expected) -> None:
    from sparse_sup.report.data import load_run
    from sparse_sup.report.report import checks

    records = [
        {
            "event": "eval",
            "label": label,
            "accuracy": acc,
            "loss": 1.0,
            "count": 2000,
            "step": 1,
            "density": 0.1,
        }
        for label, acc in accuracies.items()
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert any(expected in note for note in checks(load_run(tmp_path)))
