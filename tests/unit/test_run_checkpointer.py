"""``RunCheckpointer``: every named Stateful goes through one real run checkpoint on disk (model and
optimizer in the backend's format, masks and chain sharded with their global layout, the rest per
rank) and comes back exactly; a state the checkpoint lacks is named in a warning and left as it is.
The loop's own resume tests drive it end to end (tests/integration/test_resume.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_engine import make_engine, masks_of, same_masks, train_small_cnn
from toy_models import SmallCNN

from sparse_sup.config import load_config
from sparse_sup.train.checkpointing import ModuleBuffers, RngState, RunCheckpointer
from sparse_sup.train.logs import MetricsWriter

pytestmark = pytest.mark.usefixtures("one_thread")
OVERRIDES = ["--sparse.update_interval=2", "--schedule.epochs=1", "--schedule.batch_size=16"]
OVERRIDES += ["--tickets.num_cycles=1", "--tickets.cycles_fraction=0.5"]


class Counters:
    """A small Stateful, as the loop's own counters are (``Run`` is one)."""

    def __init__(self, **value) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return dict(self.value)

    def load_state_dict(self, state: dict) -> None:
        self.value = dict(state)


def snapshot(model, opt, engine) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},  # BN buffers included
        "momentum": {k: s["momentum_buffer"].clone() for k, s in opt.state_dict()["state"].items()},
        "masks": masks_of(engine),
        "chain": {k: v.clone() for k, v in engine.chain.tensors.items()},
        "step": engine.step,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and same_masks(a["masks"], b["masks"])
    for part in ("model", "momentum", "chain"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_every_state_comes_back_exactly_and_a_missing_one_is_named(tmp_path, caplog):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = make_engine(OVERRIDES, model, opt, SmallCNN.TARGETS, 8 * 16)
    gen = torch.Generator().manual_seed(2)
    train_small_cnn(model, opt, engine, 6, gen)  # phase 1 ends at step 4: the chain holds P
    config = load_config(None, OVERRIDES)
    loop = Counters(skipped=3)
    states = {
        "engine": engine,
        "loop": loop,
        # on one process the model's own checkpoint holds these too; per-rank BN statistics are
        # checked by the multi-process resume tests (test_regimes.py, another world size)
        "buffers": ModuleBuffers(model),
        "rng": RngState(torch.device("cpu")),
    }
    checkpointer = RunCheckpointer(tmp_path, config, engine.plan, engine.backend, states, MetricsWriter(None))
    torch.manual_seed(123)
    path = checkpointer.save()
    saved, next_draw = snapshot(model, opt, engine), torch.rand(4)

    train_small_cnn(model, opt, engine, 2, gen)  # every state moves on: weights, BN statistics, masks, chain
    loop.value, _ = {"skipped": 9}, torch.rand(4)
    moved = snapshot(model, opt, engine)
    assert moved["step"] == 8 and not torch.equal(
        moved["model"]["bn1.running_mean"], saved["model"]["bn1.running_mean"]
    )

    ema = Counters(decay=0.5)  # a state this checkpoint was written without (train.ema switched on)
    resumed = RunCheckpointer(
        tmp_path, config, engine.plan, engine.backend, {**states, "ema": ema}, MetricsWriter(None)
    )
    with caplog.at_level(logging.WARNING, logger="sparse_sup"):
        resumed.load(path)
    assert_same(snapshot(model, opt, engine), saved)
    assert loop.value == {"skipped": 3}
    assert torch.equal(torch.rand(4), next_draw)  # the generator continues where it was saved
    assert ema.value == {"decay": 0.5} and "holds no 'ema' state" in caplog.text
