"""Per-layer density allocation (ERK / uniform), exact mask counts at initialisation, the step
schedules (phases, triangle LR, GraNet cubic density, drop fraction) and plan/config validation."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from sparse_sup.backends import LocalBackend
from sparse_sup.config import load_config, resolve_plan
from sparse_sup.core.density import erk_densities, layer_counts
from sparse_sup.core.masks import MaskState
from sparse_sup.core.schedules import (
    PhasePlan,
    cosine_lr,
    drop_fraction_at,
    granet_density,
    step_decay_lr,
    triangle_lr,
    warmup_factor,
)

SHAPES = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (64, 64, 1, 1), (10, 64), (256, 512)]
DENSITIES = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8]


def _raw(shape) -> float:
    return sum(shape) / math.prod(shape)


# --- ERK -------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", DENSITIES)
def test_erk_total_close_to_target(density: float) -> None:
    counts = layer_counts(SHAPES, density, "erk")
    total = sum(math.prod(s) for s in SHAPES)
    assert abs(sum(counts) - density * total) <= len(SHAPES)  # one rounding per layer at most
    for c, s in zip(counts, SHAPES, strict=True):
        assert 1 <= c <= math.prod(s)
    # the float densities themselves add up exactly (up to float error)
    d = erk_densities(SHAPES, density)
    kept = sum(di * math.prod(s) for di, s in zip(d, SHAPES, strict=True))
    assert kept == pytest.approx(density * total, rel=1e-9)


@pytest.mark.parametrize("density", DENSITIES)
def test_erk_ratios_and_dense_layers_only_when_needed(density: float) -> None:
    d = erk_densities(SHAPES, density)
    assert all(0 < di <= 1.0 for di in d)
    sparse_idx = [i for i, di in enumerate(d) if di < 1.0]
    dense_idx = [i for i, di in enumerate(d) if di == 1.0]
    assert sparse_idx, "at these densities some layer stays sparse"
    # one common factor for the sparse layers: d_l = eps * sum(shape)/prod(shape)
    eps = d[sparse_idx[0]] / _raw(SHAPES[sparse_idx[0]])
    for i in sparse_idx:
        assert d[i] == pytest.approx(eps * _raw(SHAPES[i]), rel=1e-12)
    for i in sparse_idx:
        for j in sparse_idx:
            assert d[i] / d[j] == pytest.approx(_raw(SHAPES[i]) / _raw(SHAPES[j]), rel=1e-12)
    # a layer is dense only because the common factor would push it beyond 1
    for i in dense_idx:
        assert eps * _raw(SHAPES[i]) >= 1.0 - 1e-12
    # and no sparse layer would exceed 1
    for i in sparse_idx:
        assert eps * _raw(SHAPES[i]) <= 1.0 + 1e-12


def test_erk_low_density_has_no_dense_layer_and_high_density_does() -> None:
    assert all(d < 1.0 for d in erk_densities(SHAPES, 0.05))
    shapes = [(4, 3), (256, 256), (512, 256)]  # the tiny layer has a huge sum/prod score
    d = erk_densities(shapes, 0.3)
    assert d[0] == 1.0 and d[1] < 1.0 and d[2] < 1.0
    counts = layer_counts(shapes, 0.3, "erk")
    assert counts[0] == 12
    assert abs(sum(counts) - 0.3 * sum(math.prod(s) for s in shapes)) <= len(shapes)
    # density 1: everything dense
    assert layer_counts(shapes, 1.0, "erk") == [math.prod(s) for s in shapes]


@pytest.mark.parametrize("density", DENSITIES + [1.0])
def test_uniform_counts(density: float) -> None:
    counts = layer_counts(SHAPES, density, "uniform")
    assert counts == [max(1, round(density * math.prod(s))) for s in SHAPES]
    # a density so low it rounds to zero still keeps one weight per layer
    assert layer_counts([(10,), (3, 3)], 0.01, "uniform") == [1, 1]


def test_unknown_distribution_raises() -> None:
    with pytest.raises(ValueError, match="unknown density distribution 'gauss'"):
        layer_counts(SHAPES, 0.1, "gauss")


# --- MaskState.initialize ----------------------------------------------------------------------
TOY_NAMES = ["0.weight", "2.weight", "4.weight", "7.weight", "9.weight"]


def _toy_targets(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    return model, LocalBackend(model, None, TOY_NAMES).targets()


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 0.7])
def test_initialize_exact_counts(distribution: str, density: float) -> None:
    model, targets = _toy_targets()
    expected = layer_counts([t.shape for t in targets], density, distribution)
    state = MaskState.initialize(targets, density, distribution, seed=3)
    actual = [int(state.masks[t.name].sum()) for t in targets]
    assert actual == expected
    assert [state.counts[t.name] for t in targets] == expected
    assert state.total_active() == sum(expected)
    for t in targets:
        m = state.masks[t.name]
        assert m.dtype == torch.bool and m.shape == t.param.shape
        assert bool((t.param[~m] == 0).all())  # weights outside the mask are zeroed
        assert bool((t.param[m] != 0).all())  # and the kept ones are untouched (non-zero init)
    assert dict(model.named_parameters())["0.weight"].data_ptr() == targets[0].param.data_ptr()


def test_initialize_seed_determinism() -> None:
    _, t1 = _toy_targets()
    _, t2 = _toy_targets()
    _, t3 = _toy_targets()
    a = MaskState.initialize(t1, 0.1, "erk", seed=5)
    b = MaskState.initialize(t2, 0.1, "erk", seed=5)
    c = MaskState.initialize(t3, 0.1, "erk", seed=6)
    for name in TOY_NAMES:
        assert torch.equal(a.masks[name], b.masks[name])
    assert all(not torch.equal(a.masks[n], c.masks[n]) for n in TOY_NAMES)
    assert a.checksum(t1) == b.checksum(t2) != c.checksum(t3)
    # independent of the weights' values: masks come from counter-based keys only
    _, t4 = _toy_targets(seed=123)
    d = MaskState.initialize(t4, 0.1, "erk", seed=5)
    assert all(torch.equal(a.masks[n], d.masks[n]) for n in TOY_NAMES)


# --- PhasePlan ---------------------------------------------------------------------------------
def test_phase_plan_over_whole_budget() -> None:
    plan = PhasePlan(total_steps=20, num_cycles=3, cycle_steps=4)
    assert plan.pre_steps == 8
    expected_cycle = [None] * 8 + [0] * 4 + [1] * 4 + [2] * 4
    assert [plan.cycle_of(s) for s in range(20)] == expected_cycle
    starts = {c: plan.cycle_start(c) for c in range(21)}
    ends = {c: plan.cycle_end(c) for c in range(21)}
    assert {c: m for c, m in starts.items() if m is not None} == {8: 0, 12: 1, 16: 2}
    assert {c: m for c, m in ends.items() if m is not None} == {12: 0, 16: 1, 20: 2}
    # a cycle ends at the same count the next one starts; the cycle of step s starts at or before s
    for s in range(8, 20):
        m = plan.cycle_of(s)
        assert plan.cycle_start(8 + 4 * m) == m and plan.cycle_end(8 + 4 * (m + 1)) == m


def test_phase_plan_without_cycles() -> None:
    plan = PhasePlan(total_steps=10, num_cycles=0, cycle_steps=0)
    assert plan.pre_steps == 10
    assert all(plan.cycle_of(s) is None for s in range(10))
    assert all(plan.cycle_start(s) is None and plan.cycle_end(s) is None for s in range(11))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_steps=12, num_cycles=3, cycle_steps=4),  # no phase-1 step left
        dict(total_steps=12, num_cycles=4, cycle_steps=4),  # more than the budget
        dict(total_steps=12, num_cycles=-1, cycle_steps=4),
        dict(total_steps=12, num_cycles=1, cycle_steps=-2),
        dict(total_steps=0, num_cycles=0, cycle_steps=0),
    ],
)
def test_bad_phase_plans_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        PhasePlan(**kwargs)


def test_phase_plan_rejects_empty_cycles() -> None:
    with pytest.raises(ValueError, match="cycle_steps >= 1"):
        PhasePlan(total_steps=10, num_cycles=2, cycle_steps=0)


# --- learning rates ----------------------------------------------------------------------------
@pytest.mark.parametrize("cycle_steps", [2, 4, 10, 7])
def test_triangle_lr(cycle_steps: int) -> None:
    low, high = 1e-3, 5e-3
    lrs = [triangle_lr(s, cycle_steps=cycle_steps, lr_low=low, lr_high=high) for s in range(cycle_steps)]
    assert lrs[-1] == low  # the step that ends the cycle uses exactly lr_low
    assert all(low <= lr <= high for lr in lrs)
    if cycle_steps % 2 == 0:
        assert lrs[cycle_steps // 2 - 1] == pytest.approx(high, rel=1e-12)
        assert max(lrs) == pytest.approx(high, rel=1e-12)
    else:
        assert max(lrs) < high
    # rises to the middle, then falls
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in pairwise(lrs[: peak + 1]))
    assert all(a >= b for a, b in pairwise(lrs[peak:]))


def test_triangle_lr_over_cycles_of_a_plan() -> None:
    plan = PhasePlan(total_steps=30, num_cycles=2, cycle_steps=10)
    for m in range(2):
        end = plan.pre_steps + (m + 1) * 10  # completed steps when the cycle ends
        last = end - 1
        assert plan.cycle_of(last) == m and plan.cycle_end(end) == m
        within = last - plan.pre_steps - m * 10
        assert triangle_lr(within, cycle_steps=10, lr_low=0.01, lr_high=0.1) == 0.01


def test_step_cosine_and_warmup() -> None:
    assert step_decay_lr(0, base_lr=0.1, milestones=[5, 8], gamma=0.1) == 0.1
    assert step_decay_lr(5, base_lr=0.1, milestones=[5, 8], gamma=0.1) == pytest.approx(0.01)
    assert step_decay_lr(9, base_lr=0.1, milestones=[5, 8], gamma=0.1) == pytest.approx(0.001)
    assert cosine_lr(0, base_lr=1.0, min_lr=0.1, steps=10) == pytest.approx(1.0)
    assert cosine_lr(5, base_lr=1.0, min_lr=0.1, steps=10) == pytest.approx(0.55)
    assert cosine_lr(10, base_lr=1.0, min_lr=0.1, steps=10) == pytest.approx(0.1)
    assert cosine_lr(15, base_lr=1.0, min_lr=0.1, steps=10) == pytest.approx(0.1)
    assert warmup_factor(0, warmup_steps=4, start_factor=0.2) == pytest.approx(0.2)
    assert warmup_factor(2, warmup_steps=4, start_factor=0.2) == pytest.approx(0.6)
    assert warmup_factor(4, warmup_steps=4, start_factor=0.2) == 1.0


# --- GraNet density and drop fraction ---------------------------------------------------------
def test_granet_density_cubic() -> None:
    kw = dict(initial=0.5, final=0.1, start=10, end=50)
    assert granet_density(0, **kw) == 0.5
    assert granet_density(10, **kw) == 0.5
    assert granet_density(50, **kw) == pytest.approx(0.1)
    assert granet_density(80, **kw) == pytest.approx(0.1)
    for step in (11, 20, 30, 37, 49):
        progress = (step - 10) / 40
        assert granet_density(step, **kw) == pytest.approx(0.1 + 0.4 * (1 - progress) ** 3, rel=1e-12)
    assert granet_density(30, **kw) == pytest.approx(0.1 + 0.4 / 8)
    values = [granet_density(s, **kw) for s in range(60)]
    assert all(a >= b for a, b in pairwise(values))
    # degenerate window: a step change at start
    assert granet_density(4, initial=0.5, final=0.1, start=5, end=5) == 0.5
    assert granet_density(5, initial=0.5, final=0.1, start=5, end=5) == 0.1


def test_drop_fraction_schedules() -> None:
    kw = dict(initial=0.3, final=0.01, steps=100)
    assert drop_fraction_at(0, schedule="cosine", **kw) == pytest.approx(0.3)
    assert drop_fraction_at(100, schedule="cosine", **kw) == pytest.approx(0.01)
    assert drop_fraction_at(50, schedule="cosine", **kw) == pytest.approx(0.155)
    assert drop_fraction_at(250, schedule="cosine", **kw) == pytest.approx(0.01)
    assert all(drop_fraction_at(s, schedule="constant", **kw) == 0.3 for s in (0, 50, 100))
    with pytest.raises(ValueError, match="unknown drop-fraction schedule 'linear'"):
        drop_fraction_at(0, schedule="linear", **kw)


# --- resolve_plan and config errors ------------------------------------------------------------
def test_resolve_plan_values() -> None:
    cfg = load_config(
        None,
        [
            "--schedule.epochs=10",
            "--schedule.batch_size=16",
            "--tickets.num_cycles=2",
            "--tickets.cycle_epochs=1.5",
            "--tickets.cycles_fraction=null",
            "--sparse.method=granet",
            "--sparse.granet_prune_start_epoch=1",
            "--sparse.granet_prune_end_epoch=4",
            "--schedule.warmup_epochs=0.5",
        ],
    )
    plan = resolve_plan(cfg, 165)  # 10 steps per epoch (the remainder is dropped)
    assert plan.steps_per_epoch == 10
    assert plan.total_steps == 100
    assert plan.cycle_steps == 15 and plan.num_cycles == 2 and plan.pre_steps == 70
    assert plan.warmup_steps == 5
    assert plan.lr_milestones == (35, 52)  # round(0.5 * 70), round(0.75 * 70)
    assert plan.prune_start == 10 and plan.prune_end == 40
    # the prune window is capped at the end of phase 1
    cfg2 = load_config(
        None,
        [
            "--schedule.epochs=10",
            "--schedule.batch_size=16",
            "--tickets.num_cycles=1",
            "--tickets.cycles_fraction=0.2",
        ],
    )
    plan2 = resolve_plan(cfg2, 160)
    assert plan2.cycle_steps == 20 and plan2.pre_steps == 80 and plan2.prune_end == 80


def test_cycles_that_do_not_fit_raise() -> None:
    cfg = load_config(
        None,
        [
            "--schedule.epochs=2",
            "--schedule.batch_size=10",
            "--tickets.num_cycles=2",
            "--tickets.cycle_epochs=1",
            "--tickets.cycles_fraction=null",
        ],
    )
    with pytest.raises(ValueError, match="tickets.num_cycles=2"):
        resolve_plan(cfg, 100)
    cfg = load_config(
        None,
        [
            "--schedule.epochs=1",
            "--schedule.batch_size=10",
            "--tickets.num_cycles=1",
            "--tickets.cycles_fraction=0.1",
        ],
    )
    with pytest.raises(ValueError, match="too short"):  # a one-step cycle
        resolve_plan(cfg, 100)
    cfg = load_config(None, ["--schedule.batch_size=256"])
    with pytest.raises(ValueError, match="schedule.batch_size=256"):
        resolve_plan(cfg, 100)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_bad_density_raises(value: str) -> None:
    with pytest.raises(ValueError, match=r"sparse\.density"):
        load_config(None, [f"--sparse.density={value}"])


def test_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match=r"sparse\.method='snip'.*'granet', 'rigl', 'set'"):
        load_config(None, ["--sparse.method=snip"])  # the choices are the registry's


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ValueError) as info:
        load_config(None, ["--sparse.densty=0.1"])
    message = str(info.value)
    assert "sparse.densty" in message and "did you mean 'density'" in message
    for key in ("method", "density", "distribution", "update_interval", "drop_fraction"):
        assert key in message.split("accepts:")[1]
    with pytest.raises(ValueError, match="unknown config section 'sparce'"):
        load_config(None, ["--sparce.density=0.1"])
    with pytest.raises(ValueError, match=r"sparse\.update_interval='x' is invalid: expected int"):
        load_config(None, ["--sparse.update_interval=x"])


def test_granet_initial_density_below_final_raises() -> None:
    with pytest.raises(ValueError, match="sparse.granet_initial_density"):
        load_config(
            None, ["--sparse.method=granet", "--sparse.density=0.5", "--sparse.granet_initial_density=0.2"]
        )
