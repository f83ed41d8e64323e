"""The CLI loop's step (``backend.optimizer_step()``) writes the engine's LR into every parameter group
keeping each group's ratio to group 0 (layer-wise LR decay, a head at its own LR), in phase 1 and in
the cycles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy_models import SmallCNN

from sparse_sup.backends import build_backend
from sparse_sup.config import load_config, resolve_plan
from sparse_sup.engine import SupTicketsEngine

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_group_keeps_its_lr_ratio_through_phase1_and_cycles():
    torch.manual_seed(0)
    model = SmallCNN()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(
        [{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.025}], lr=0.1, momentum=0.9
    )
    backend = build_backend(model, optimizer, SmallCNN.TARGETS)
    config = load_config(
        None,
        ["--schedule.epochs=1", "--schedule.batch_size=16", "--sparse.update_interval=2"]
        + ["--tickets.num_cycles=2", "--tickets.cycles_fraction=0.5", "--tickets.lr_high=0.05"],
    )
    engine = SupTicketsEngine.from_config(config, resolve_plan(config, 12 * 16), backend)
    engine.init_masks()
    seen = []
    optimizer.register_step_post_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
    for _ in range(engine.plan.total_steps):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        lr = engine.lr()
        backend.backward(F.cross_entropy(model(x), y), 1)
        assert backend.optimizer_step()
        assert seen[-1] == pytest.approx([lr, lr / 4])
    assert engine.plan.pre_steps < engine.step and len({lrs[0] for lrs in seen}) > 2  # cycles ran
