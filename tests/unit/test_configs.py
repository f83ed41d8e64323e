"""Every preset loads strictly; the recipes resolve to the budgets of SPEC.md; overrides work."""

from pathlib import Path

import pytest

from sparse_sup.config import config_to_dict, load_config, resolve_plan
from sparse_sup.config.loader import build_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_loads_and_round_trips(path):
    config = load_config(path)
    assert build_config(config_to_dict(config)) == config


def test_cifar_recipe_budget():
    config = load_config(CONFIGS[0].parent / "cifar10-resnet50-rigl.yaml")
    plan = resolve_plan(config, 50_000)  # 390 steps per epoch at batch 128
    assert plan.steps_per_epoch == 390
    assert plan.total_steps == 250 * 390 and plan.cycle_steps == 8 * 390 and plan.num_cycles == 3
    assert plan.pre_steps == 226 * 390
    assert plan.lr_milestones == (round(0.5 * 226 * 390), round(0.75 * 226 * 390))
    assert config.sparse.update_interval == 1000 and config.tickets.mask_in_cycles == "frozen"


def test_imagenet_recipe_budget():
    config = load_config(CONFIGS[0].parent / "imagenet-resnet50-rigl.yaml")
    plan = resolve_plan(config, 1_281_167)
    assert plan.pre_steps == 92 * plan.steps_per_epoch
    assert plan.num_cycles == 4 and plan.cycle_steps == 2 * plan.steps_per_epoch
    assert [round(m / plan.steps_per_epoch) for m in plan.lr_milestones] == [30, 60, 85]
    assert config.tickets.mask_in_cycles == "update" and config.tickets.reexplore_fraction == 0


def test_granet_preset_inherits_and_overrides():
    config = load_config(
        CONFIGS[0].parent / "cifar10-resnet50-granet.yaml", ["--sparse.density=0.05", "--optim.lr=0.2"]
    )
    assert config.sparse.method == "granet" and config.sparse.granet_prune_end_epoch == 110
    assert config.sparse.density == 0.05 and config.optim.lr == 0.2
    assert config.model.name == "resnet50" and config.tickets.cycle_epochs == 8


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--sparse.density=-0.1", "sparse.density=-0.1"),
        ("--optim.lr=fast", "optim.lr='fast'"),
        ("--tickets.merge=median", "tickets.merge='median'"),
        ("--nosuch.key=1", "unknown config section 'nosuch'"),
        ("--train.precision=fp8", "train.precision"),
        ("--schedule.lr_milestones=[0.5, 1.5]", "schedule.lr_milestones"),
        ("--schedule.grad_accum_steps=true", "schedule.grad_accum_steps"),
    ],
)
def test_bad_values_name_key_and_value(override, fragment):
    with pytest.raises(ValueError, match=None) as info:
        load_config(None, [override])
    assert fragment in str(info.value)
