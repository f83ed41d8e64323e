"""train.ema: timm's ModelEmaV3 of the live weights, kept exactly inside the masks while the masks
move (topology updates, then cycles), on a real timm ResNet."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from sparse_sup.backends import build_backend
from sparse_sup.config import ConfigError, load_config, resolve_plan
from sparse_sup.core.names import normalize_name
from sparse_sup.engine import SupTicketsEngine
from sparse_sup.models import build_model, select_targets
from sparse_sup.train.ema import build_ema
from sparse_sup.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ema_is_timm_ema_times_the_live_masks_through_topology_updates_and_cycles():
    torch.manual_seed(0)
    model = build_model("test_resnet", 10)
    config = load_config(
        None,
        ["--schedule.epochs=1", "--schedule.batch_size=8", "--sparse.update_interval=2"]
        + ["--tickets.num_cycles=2", "--tickets.cycles_fraction=0.5", "--tickets.mask_in_cycles=update"]
        + ["--tickets.bn_recalibration=false", "--train.ema=true", "--train.ema_decay=0.8"],
    )
    optimizer = build_optimizer(model, config.optim)
    backend = build_backend(model, optimizer, select_targets(model))
    engine = SupTicketsEngine.from_config(config, resolve_plan(config, 12 * 8), backend)
    engine.init_masks()
    ema = build_ema(config.train, backend, engine.masks.masks)
    params = dict(model.named_parameters())
    emas = {normalize_name(n): p for n, p in ema.module.named_parameters()}
    masks = engine.masks.masks
    assert all(torch.equal(emas[n], params[n] * masks[n]) for n in masks)  # starts as the masked model
    dropped = 0
    for _ in range(engine.plan.total_steps):
        before = {n: p.detach().clone() for n, p in emas.items()}
        old_masks = {n: m.clone() for n, m in masks.items()}
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        backend.backward(F.cross_entropy(model(x), y), 1)
        assert backend.optimizer_step()
        ema.update(model, masks)
        for name, mask in masks.items():
            expected = (0.8 * before[name] + 0.2 * params[name].detach()) * mask
            assert torch.allclose(emas[name], expected, atol=1e-6), name
            assert int(torch.count_nonzero(emas[name][~mask])) == 0  # exactly inside the mask
            dropped += int((old_masks[name] & ~mask & (before[name] != 0)).sum())
        for name in ("bn1.running_mean",) if hasattr(model, "bn1") else ():
            assert not torch.equal(
                ema.module.state_dict()[name], model.state_dict()[name]
            )  # buffers averaged
    assert dropped > 0  # masks moved under the EMA: weights left it at once
    assert engine.plan.pre_steps < engine.step  # the cycles ran
    state = ema.state_dict()
    other = build_ema(config.train, backend, masks)
    other.load_state_dict(state)
    assert all(torch.equal(v, other.module.state_dict()[k]) for k, v in state.items())


def test_ema_is_refused_where_weights_are_sharded():
    train = load_config(None, ["--train.ema=true"]).train
    with pytest.raises(ConfigError, match="train.ema=true is supported on one process and DDP"):
        build_ema(train, types.SimpleNamespace(kind="fsdp2"), {})
    assert build_ema(load_config(None, []).train, types.SimpleNamespace(kind="fsdp2"), {}) is None
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(None, ["--train.ema_decay=1.0"])
