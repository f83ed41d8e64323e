"""Every preset loads strictly; the recipes resolve to the budgets of SPEC.md; overrides work."""

import re
from pathlib import Path

import pytest

from sparse_sup.config import ConfigError, config_to_dict, load_config, resolve_plan
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


# --- every float key refuses inf/NaN; element types of lists are checked -------------------------


def _float_keys() -> list[str]:
    import dataclasses
    import typing

    from sparse_sup.config import Config

    keys = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            scalar = (
                hint is float
                or typing.get_origin(hint) not in (list, tuple)
                and float in typing.get_args(hint)
            )
            if scalar:  # float or float | None; lists of floats: test_list_elements_are_checked
                keys.append(f"{section.name}.{f.name}")
    return keys


FLOAT_KEYS = _float_keys()


def test_float_keys_found():
    assert {"schedule.epochs", "optim.lr", "sparse.density", "tickets.cycle_epochs"} <= set(FLOAT_KEYS)
    assert len(FLOAT_KEYS) >= 20


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_key_refuses_non_finite(key, value):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=.*expected a finite number"):
        load_config(None, [f"--{key}={value}"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--schedule.lr_milestones=[0.5, .inf]", "schedule.lr_milestones[1]=inf"),
        ("--schedule.lr_milestones=[0.5, fast]", "schedule.lr_milestones[1]='fast'"),
        ("--optim.betas=[0.9]", "optim.betas=[0.9] is invalid: expected 2 values"),
        ("--optim.betas=[0.9, .nan]", "optim.betas[1]=nan"),
        ("--sparse.exclude=[1]", "sparse.exclude[0]=1"),
    ],
)
def test_list_elements_are_checked(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_lists_and_tuples_are_coerced():
    config = load_config(None, ["--schedule.lr_milestones=[0.5, 0.75]", "--optim.betas=[0, 0.99]"])
    assert config.optim.betas == (0.0, 0.99) and all(isinstance(b, float) for b in config.optim.betas)
    assert config.schedule.lr_milestones == [0.5, 0.75]


def test_yaml_errors_name_file_line_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparse:\n  density: 0.1\n  method: [rigl\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml'?, line \d+, column \d+: YAML syntax error"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"override '--sparse.method=\{a', line 1, column \d+: YAML syntax"):
        load_config(None, ["--sparse.method={a"])


# --- batch split, kwargs, renamed keys, normalisation, presets by name --------------------------------


def test_accumulation_must_divide_the_batch():
    from sparse_sup.config import check_batch_split

    with pytest.raises(
        ConfigError, match="schedule.grad_accum_steps=3 is invalid: a divisor of schedule.batch_size=128"
    ):
        load_config(None, ["--schedule.grad_accum_steps=3"])
    config = load_config(None, ["--schedule.grad_accum_steps=4", "--schedule.batch_size=64"])
    check_batch_split(config.schedule, 4)  # 64 = 4 processes x 4 micro-batches x 4
    with pytest.raises(ConfigError, match="does not split over 3 process"):
        check_batch_split(config.schedule, 3)


@pytest.mark.parametrize("text", ["{img_size:32}", "{img_size: null}"])
def test_model_kwargs_without_values_are_refused(text):
    with pytest.raises(ConfigError, match=r"model.kwargs=.*YAML needs a space after ':'"):
        load_config(None, [f"--model.kwargs={text}"])
    assert load_config(None, ["--model.kwargs={img_size: 32}"]).model.kwargs == {"img_size": 32}


def test_ema_key_is_named_for_the_ticket_weight():
    assert load_config(None, ["--tickets.ema_ticket_weight=0.2"]).tickets.ema_ticket_weight == 0.2
    with pytest.raises(ConfigError, match="renamed to tickets.ema_ticket_weight"):
        load_config(None, ["--tickets.ema_decay=0.8"])
    # configs written before the rename hold the neutral 0.5 (both readings agree): they still load
    assert load_config(None, ["--tickets.ema_decay=0.5"]).tickets.ema_ticket_weight == 0.5


def test_normalisation_defaults_follow_the_dataset():
    from sparse_sup.data import (
        CIFAR10_MEAN,
        CIFAR100_MEAN,
        CIFAR100_STD,
        IMAGENET_MEAN,
        dataset_normalization,
    )

    assert dataset_normalization("bundled", "cifar")[1] == CIFAR10_MEAN
    assert dataset_normalization("../shared/data/cifar10", "cifar")[1] == CIFAR10_MEAN
    assert dataset_normalization("uoft-cs/cifar100", "cifar")[1:] == (CIFAR100_MEAN, CIFAR100_STD)
    assert dataset_normalization("/data/CIFAR-100", "cifar")[1] == CIFAR100_MEAN
    assert dataset_normalization("/data/imagenet-1k", "imagenet")[1] == IMAGENET_MEAN
    assert dataset_normalization("/data/my_pets", "imagenet")[1] == IMAGENET_MEAN
    assert dataset_normalization("/data/my_pets", "cifar")[1] == CIFAR10_MEAN
    assert load_config(CONFIGS[0].parent / "cifar100-resnet50-rigl.yaml").data.mean is None  # auto
    config = load_config(None, ["--data.mean=[0.5, 0.5, 0.5]", "--data.std=[0.25, 0.25, 0.25]"])
    assert config.data.mean == [0.5] * 3 and config.data.std == [0.25] * 3
    with pytest.raises(ConfigError, match="data.std"):
        load_config(None, ["--data.mean=[0.5, 0.5, 0.5]", "--data.std=[0.25, 0, 0.25]"])


def test_presets_by_name():
    from sparse_sup.config import preset_names, resolve_config_path

    assert {"debug-cpu", "tiny-test", "cifar10-resnet50-rigl"} <= set(preset_names())
    assert resolve_config_path("debug-cpu") == CONFIGS[0].parent / "debug-cpu.yaml"
    assert resolve_config_path("debug-cpu.yaml").name == "debug-cpu.yaml"
    assert load_config("tiny-test") == load_config(CONFIGS[0].parent / "tiny-test.yaml")
    with pytest.raises(ConfigError, match="did you mean 'debug-cpu'"):
        load_config("debug-cpo")


@pytest.mark.parametrize(
    "override, reason",
    [
        ("--data.style=imagenet", "data.style='imagenet'"),
        ("--data.image_size=72", "data.image_size=72"),
        ("--data.streaming=true", "data.streaming=true"),
        ("--data.auto_augment=rand-m9-mstd0.5", "data.auto_augment='rand-m9-mstd0.5'"),
        ("--data.color_jitter=0.4", "data.color_jitter=0.4"),
    ],
)
def test_data_on_device_is_refused_where_images_are_decoded_per_sample(override, reason):
    """``data.on_device`` gathers from images decoded up front; a lazy or PIL path is named, with the fix."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--data.on_device=true", override])
    message = str(info.value)
    assert message.startswith("data.on_device=True is invalid") and reason in message
    assert "set data.on_device=false" in message
    assert load_config(None, ["--data.on_device=true"]).data.on_device  # the in-memory default: accepted
