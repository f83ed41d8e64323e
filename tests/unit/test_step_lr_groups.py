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


@pytest.mark.parametrize(
    "name, extra",
    [("adamw", []), ("adamw", ["--optim.fused=true"]), ("lamb", []), ("lars", []), ("sgd", [])],
)
def test_timm_layer_decay_groups_keep_their_scale_and_masks_stay_exact(name, extra):
    """timm's create_optimizer_v2 with layer_decay on a real timm ViT: every group steps at
    lr_scale x the engine's LR (scale-1 group first), through phase 1 and the cycles; masked
    weights and optimizer state stay exactly zero (sparse.check_invariants after every step)."""
    from sparse_sup.core.invariants import check_step
    from sparse_sup.models import build_model, select_targets
    from sparse_sup.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model("test_vit", 10, kwargs={"img_size": 16, "patch_size": 4})
    config = load_config(
        None,
        ["--schedule.epochs=1", "--schedule.batch_size=8", "--sparse.update_interval=2"]
        + ["--tickets.num_cycles=2", "--tickets.cycles_fraction=0.5", "--tickets.lr_high=0.05"]
        + [f"--optim.name={name}", "--optim.lr=0.01", "--optim.layer_decay=0.7", "--optim.weight_decay=0.05"]
        + ["--sparse.check_invariants=true", "--sparse.density=0.3", *extra],
    )
    optimizer = build_optimizer(model, config.optim)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    assert scales[0] == 1.0 and len(set(scales)) >= 5 and min(scales) < 0.2  # a real decay over depth
    if extra:
        assert all(g["fused"] for g in optimizer.param_groups)
    backend = build_backend(model, optimizer, select_targets(model))
    engine = SupTicketsEngine.from_config(config, resolve_plan(config, 10 * 8), backend)
    engine.init_masks()
    seen = []
    optimizer.register_step_post_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
    for _ in range(engine.plan.total_steps):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        lr = engine.lr()
        backend.backward(F.cross_entropy(model(x), y), 1)
        assert backend.optimizer_step()
        assert seen[-1] == pytest.approx([lr * s for s in scales])
    assert engine.plan.pre_steps < engine.step and len({lrs[0] for lrs in seen}) > 2  # cycles ran
    check_step(engine.targets, engine.masks, backend.data_parallel, "end")
    states = [s for t in engine.targets for s in t.optimizer_states()]
    assert states and any(s.abs().sum() > 0 for s in states)  # the optimizer's state is masked, not empty


def test_optimizer_names_are_timm_names_checked_up_front():
    from sparse_sup.config import ConfigError, OptimConfig
    from sparse_sup.train.optim import build_optimizer, check_optimizer_name

    with pytest.raises(ConfigError, match=r"optim.name='adamx' is not a timm optimizer; known: .*adamw"):
        check_optimizer_name(OptimConfig(name="adamx"))
    with pytest.raises(ConfigError, match="Lookahead"):
        check_optimizer_name(OptimConfig(name="lookahead_adamw"))
    model = SmallCNN()
    plain = build_optimizer(model, OptimConfig(name="sgd", nesterov=False))
    nesterov = build_optimizer(model, OptimConfig(name="sgd", nesterov=True))
    assert type(plain) is torch.optim.SGD and not plain.defaults["nesterov"] and nesterov.defaults["nesterov"]
    assert type(build_optimizer(model, OptimConfig(name="lamb", lr=1e-3))).__name__ == "Lamb"
