"""Mask state and topology updates (drop-and-grow, global prune), then the same invariants over
full engine runs with real optimizers: masked weights and optimizer state stay exactly zero,
per-layer counts are exact, and no parameter or optimizer-state tensor is ever reallocated."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from toy_models import SmallCNN

from sparse_sup.backends import LocalBackend
from sparse_sup.config import load_config, resolve_plan
from sparse_sup.core.collectives import LOCAL
from sparse_sup.core.density import layer_counts
from sparse_sup.core.masks import MaskState
from sparse_sup.core.topology import drop_and_grow, global_magnitude_masks, global_prune
from sparse_sup.engine import EngineHooks, SupTicketsEngine
from sparse_sup.tickets import recalibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers -----------------------------------------------------------------------------------
def stable_pick(values: torch.Tensor, k: int, largest: bool, eligible: torch.Tensor) -> torch.Tensor:
    """Reference: the k largest/smallest eligible values, ties to the lowest flat index."""
    flat, elig = values.reshape(-1).double(), eligible.reshape(-1)
    idx = elig.nonzero()[:, 0]
    key = -flat[idx] if largest else flat[idx]
    order = torch.sort(key, stable=True).indices
    out = torch.zeros_like(elig)
    out[idx[order[:k]]] = True
    return out.view(values.shape)


CONV_NAMES = ["0.weight", "1.weight", "3.weight"]


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def shaped_states(opt: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """Every optimizer state tensor of ``p`` shaped like it (momentum, exp_avg, exp_avg_sq)."""
    return [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]


def setup_with_states(kind: str, seed: int = 0):
    """A model whose optimizer has state (one dense step) and whose states are then non-zero
    everywhere, so resets to zero are visible."""
    model = conv_model(seed)
    opt = make_optimizer(kind, model.parameters())
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    targets = LocalBackend(model, opt, CONV_NAMES).targets()
    params = dict(model.named_parameters())
    for n in CONV_NAMES:
        states = shaped_states(opt, params[n])
        assert len(states) == (1 if kind == "sgd" else 2)
    return model, opt, targets


# --- drop and grow -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "grow,opt_kind", [("random", "sgd"), ("gradient", "sgd"), ("random", "adam"), ("gradient", "adam")]
)
def test_drop_and_grow_invariants_over_20_updates(grow: str, opt_kind: str) -> None:
    model, opt, targets = setup_with_states(opt_kind)
    params = dict(model.named_parameters())
    state = MaskState.initialize(targets, 0.2, "erk", seed=1)
    init_counts = layer_counts([t.shape for t in targets], 0.2, "erk")
    assert [state.counts[t.name] for t in targets] == init_counts
    mask_ptrs = {n: m.data_ptr() for n, m in state.masks.items()}
    g = torch.Generator().manual_seed(0)
    for update in range(20):
        # training moved the active weights; optimizer state is non-zero everywhere
        for t in targets:
            m = state.masks[t.name]
            t.param.add_(torch.randn(t.shape, generator=g) * m)
            params[t.name].grad = torch.randn(t.shape, generator=g)
            for s in shaped_states(opt, params[t.name]):
                s.copy_(torch.rand(t.shape, generator=g) + 0.5)
        old = {t.name: state.masks[t.name].clone() for t in targets}
        old_w = {t.name: t.param.clone() for t in targets}
        old_s = {t.name: [s.clone() for s in shaped_states(opt, params[t.name])] for t in targets}
        fraction = 0.3
        num_swap = {t.name: round(fraction * state.counts[t.name]) for t in targets}
        scores = {t.name: params[t.name].grad.abs() for t in targets}
        swapped = drop_and_grow(
            targets,
            state,
            fraction,
            grow,
            step=100 + update,
            seed=7,
            collectives=LOCAL,
            grad_scores=scores if grow == "gradient" else None,
        )
        assert swapped == num_swap
        assert all(v > 0 for v in swapped.values())
        for t in targets:
            m, n = state.masks[t.name], t.name
            dropped = stable_pick(old_w[n].abs(), num_swap[n], largest=False, eligible=old[n])
            kept = old[n] & ~dropped
            grown = m & ~kept
            # counts: exact, and the cached counts agree with the masks
            assert int(m.sum()) == state.counts[n] == init_counts[targets.index(t)]
            assert bool((m | ~kept).all()), "a weight that was not among the smallest was dropped"
            assert int(grown.sum()) == num_swap[n]
            if grow == "gradient":
                assert torch.equal(grown, stable_pick(scores[n], num_swap[n], largest=True, eligible=~kept))
            # weights: zero outside, zero where newly grown, untouched where kept or re-grown
            # right after being dropped (RigL's reference keeps those)
            newly = grown & ~old[n]
            retained = m & old[n]
            assert bool((t.param[~m] == 0).all())
            assert bool((t.param[newly] == 0).all())
            assert torch.equal(t.param[retained], old_w[n][retained])
            # optimizer state: zero outside and where newly grown, untouched where retained
            for s, s_old in zip(shaped_states(opt, params[n]), old_s[n], strict=True):
                assert bool((s[~m] == 0).all()) and bool((s[newly] == 0).all())
                assert torch.equal(s[retained], s_old[retained])
            # the mask tensors are updated in place
            assert m.data_ptr() == mask_ptrs[n]
        assert state.counts == {t.name: int(state.masks[t.name].sum()) for t in targets}


def test_drop_breaks_magnitude_ties_to_lowest_index() -> None:
    model, opt, targets = setup_with_states("sgd")
    state = MaskState.initialize(targets, 0.5, "uniform", seed=0)
    g = torch.Generator().manual_seed(3)
    for t in targets:
        # |w| in {1, 2, 3} with random signs: lots of exact ties
        sign = torch.randint(0, 2, t.shape, generator=g) * 2 - 1
        values = torch.randint(1, 4, t.shape, generator=g).float() * sign
        t.param.copy_(values * state.masks[t.name])
    old = {t.name: state.masks[t.name].clone() for t in targets}
    old_w = {t.name: t.param.clone() for t in targets}
    # RigL with zero gradients at the just-dropped positions and ones elsewhere: nothing dropped
    # comes back, so the dropped set is visible in the new masks
    scores = {t.name: (~old[t.name]).float() for t in targets}
    drop_and_grow(targets, state, 0.4, "gradient", step=1, seed=0, collectives=LOCAL, grad_scores=scores)
    for t in targets:
        n = t.name
        dropped = old[n] & ~state.masks[n]
        k = round(0.4 * int(old[n].sum()))
        assert int(dropped.sum()) == k
        assert torch.equal(dropped, stable_pick(old_w[n].abs(), k, largest=False, eligible=old[n]))
        # regrowth took the lowest-index inactive positions (all scores tie at 1 there)
        grown = state.masks[n] & ~old[n]
        assert torch.equal(grown, stable_pick(scores[n], k, largest=True, eligible=~(old[n] & ~dropped)))


def test_set_regrowth_deterministic_per_seed_and_step() -> None:
    results = {}
    for key, (seed, step) in {"a": (3, 10), "b": (3, 10), "c": (3, 11), "d": (4, 10)}.items():
        model, opt, targets = setup_with_states("sgd", seed=0)
        state = MaskState.initialize(targets, 0.3, "erk", seed=0)
        drop_and_grow(targets, state, 0.5, "random", step=step, seed=seed, collectives=LOCAL)
        results[key] = {n: m.clone() for n, m in state.masks.items()}
    for n in CONV_NAMES:
        assert torch.equal(results["a"][n], results["b"][n])
        assert not torch.equal(results["a"][n], results["c"][n])
        assert not torch.equal(results["a"][n], results["d"][n])


def test_gradient_growth_requires_scores() -> None:
    _, _, targets = setup_with_states("sgd")
    state = MaskState.initialize(targets, 0.3, "erk", seed=0)
    with pytest.raises(RuntimeError, match="gradient regrowth needs"):
        drop_and_grow(targets, state, 0.5, "gradient", step=1, seed=0, collectives=LOCAL, grad_scores=None)


# --- global prune ------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
def test_global_prune_keeps_exact_count_by_global_magnitude(ties: bool) -> None:
    model, opt, targets = setup_with_states("sgd")
    params = dict(model.named_parameters())
    state = MaskState.initialize(targets, 0.5, "erk", seed=2)
    if ties:
        g = torch.Generator().manual_seed(0)
        for t in targets:
            t.param.copy_(torch.randint(-2, 3, t.shape, generator=g).float() * state.masks[t.name])
    old = {t.name: state.masks[t.name].clone() for t in targets}
    flat_w = torch.cat([t.param.reshape(-1).abs() for t in targets])
    flat_m = torch.cat([old[t.name].reshape(-1) for t in targets])
    before = state.total_active()
    keep = before // 3
    expected = stable_pick(flat_w, keep, largest=True, eligible=flat_m)
    global_prune(targets, state, keep, LOCAL)
    got = torch.cat([state.masks[t.name].reshape(-1) for t in targets])
    assert state.total_active() == keep == int(got.sum())
    assert torch.equal(got, expected)
    assert state.counts == {t.name: int(state.masks[t.name].sum()) for t in targets}
    for t in targets:
        m = state.masks[t.name]
        assert bool((t.param[~m] == 0).all())
        for s in shaped_states(opt, params[t.name]):
            assert bool((s[~m] == 0).all())
    # asking for as many or more than are active changes nothing
    snapshot = {n: m.clone() for n, m in state.masks.items()}
    global_prune(targets, state, keep, LOCAL)
    global_prune(targets, state, keep + 10, LOCAL)
    assert all(torch.equal(snapshot[n], state.masks[n]) for n in snapshot)


def test_global_magnitude_masks_single_threshold() -> None:
    _, _, targets = setup_with_states("sgd")
    values = [torch.full(t.shape, float(i + 1)) for i, t in enumerate(targets)]
    total = sum(t.numel for t in targets)
    keep = targets[-1].numel + 5
    masks = global_magnitude_masks(targets, values, keep, LOCAL)
    # the last layer has the largest values: all of it, then the 5 lowest indices of the middle one
    assert bool(masks[targets[-1].name].all())
    assert masks[targets[1].name].reshape(-1).nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert not bool(masks[targets[0].name].any())
    assert sum(int(m.sum()) for m in masks.values()) == keep < total


# --- full training runs with the engine --------------------------------------------------------


BN_TARGETS = SmallCNN.TARGETS
NUM_SAMPLES, BATCH = 160, 16


class Recorder(EngineHooks):
    def __init__(self, model: nn.Module, data: torch.Tensor) -> None:
        self.model, self.data = model, data
        self.prunes: list[tuple[int, int, int, int]] = []  # step, before, after, expected keep
        self.events: list[tuple[str, int]] = []

    def recalibrate_bn(self, engine) -> None:
        assert recalibrate_batchnorm(self.model, self.data.split(32)) == 2

    def on_ticket(self, engine, index) -> None:
        self.events.append(("ticket", engine.step))

    def on_superposed(self, engine, index) -> None:
        self.events.append(("superposed", engine.step))

    def on_topology_update(self, engine, kind, swapped) -> None:
        self.events.append((kind, engine.step))
        if kind == "prune":
            step, n = engine.step, engine.total_target_weights
            after = engine.masks.total_active()
            if step == engine.plan.pre_steps:
                keep = round(engine.sparse.density * n)
            else:
                plan, s = engine.plan, engine.sparse
                progress = min(1.0, max(0.0, (step - plan.prune_start) / (plan.prune_end - plan.prune_start)))
                cubic = s.density + (s.granet_initial_density - s.density) * (1 - progress) ** 3
                assert engine.method.prune_density(step) == pytest.approx(cubic, rel=1e-12)
                keep = round(cubic * n)
            self.prunes.append((step, after + swapped["pruned"], after, keep))


def all_tensor_ptrs(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    ptrs = {f"p:{n}": p.data_ptr() for n, p in model.named_parameters()}
    ptrs.update({f"b:{n}": b.data_ptr() for n, b in model.named_buffers()})
    names = {p: n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                ptrs[f"s:{names[p]}:{k}"] = v.data_ptr()
    return ptrs


RUNS = [
    ("set", "sgd", "frozen"),
    ("rigl", "sgd", "frozen"),
    ("granet", "sgd", "frozen"),
    ("set", "adamw", "update"),
    ("rigl", "adamw", "update"),
    ("granet", "adamw", "frozen"),
]


@pytest.mark.parametrize("method,opt_kind,in_cycles", RUNS)
def test_training_invariants_every_step(method: str, opt_kind: str, in_cycles: str) -> None:
    overrides = [
        f"--sparse.method={method}",
        "--sparse.density=0.1",
        "--sparse.update_interval=5",
        "--sparse.drop_fraction=0.3",
        "--schedule.epochs=6",
        f"--schedule.batch_size={BATCH}",
        "--tickets.num_cycles=2",
        "--tickets.cycle_epochs=1",
        "--tickets.cycles_fraction=null",
        f"--tickets.mask_in_cycles={in_cycles}",
        "--schedule.lr_schedule=cosine",
    ]
    if method == "granet":
        overrides += ["--sparse.granet_initial_density=0.5", "--sparse.granet_prune_end_epoch=3"]
    lr = 0.05 if opt_kind == "sgd" else 1e-2
    cfg = load_config(None, [*overrides, f"--optim.lr={lr}", "--experiment.seed=0"])
    plan = resolve_plan(cfg, NUM_SAMPLES)
    assert (plan.total_steps, plan.pre_steps, plan.cycle_steps) == (60, 40, 10)
    torch.manual_seed(0)
    model = SmallCNN()
    opt = make_optimizer(opt_kind, model.parameters())
    x, y = torch.randn(NUM_SAMPLES, 3, 6, 6), torch.randint(0, 10, (NUM_SAMPLES,))
    hooks = Recorder(model, x)
    engine = SupTicketsEngine.from_config(cfg, plan, LocalBackend(model, opt, BN_TARGETS), hooks)
    engine.init_masks()
    params = dict(model.named_parameters())
    n_total = engine.total_target_weights
    init_counts = dict(engine.masks.counts)
    assert list(init_counts.values()) == layer_counts(
        [params[n].shape for n in BN_TARGETS], engine.method.initial_density, "erk"
    )
    ptrs = None
    for step in range(plan.total_steps):
        i = (step * BATCH) % NUM_SAMPLES
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH]).backward()
        for group in opt.param_groups:
            group["lr"] = engine.lr()
        engine.before_optimizer_step()
        for n in BN_TARGETS:  # gradients of masked weights are zero before the step
            assert bool((params[n].grad[~engine.masks.masks[n]] == 0).all())
        opt.step()
        engine.after_optimizer_step(skipped=False)
        assert engine.step == step + 1
        # invariants after every step
        for n in BN_TARGETS:
            m = engine.masks.masks[n]
            assert bool((params[n][~m] == 0).all()), (step, n)
            states = shaped_states(opt, params[n])
            assert len(states) == (1 if opt_kind == "sgd" else 2)
            for s in states:
                assert bool((s[~m] == 0).all()), (step, n)
        counts = engine.masks.counts
        assert counts == {n: int(engine.masks.masks[n].sum()) for n in BN_TARGETS}
        if engine.step < plan.total_steps and method != "granet":
            assert counts == init_counts, step
        if ptrs is None:
            ptrs = all_tensor_ptrs(model, opt)
        else:
            assert all_tensor_ptrs(model, opt) == ptrs, step
    # the final model is S_2, re-pruned to floor(d * N)
    assert engine.masks.total_active() == math.floor(0.1 * n_total) == engine.final_keep
    kinds = [k for k, _ in hooks.events]
    assert kinds.count("ticket") == 2 and kinds.count("superposed") == 2
    assert ("reexplore", 40) in hooks.events and ("reexplore", 50) in hooks.events
    updates = sorted({s for k, s in hooks.events if k == "update"})
    expected_updates = list(range(5, 40, 5)) + ([45, 55] if in_cycles == "update" else [])
    assert updates == expected_updates  # a cycle start re-explores instead of updating
    if method == "granet":
        steps = [p[0] for p in hooks.prunes]
        assert steps == list(range(5, 40, 5)) + [40]
        pruned = 0
        for step, before, after, keep in hooks.prunes:
            assert after == min(before, keep), (step, before, after, keep)
            pruned += after == keep < before
        assert pruned >= 6  # the schedule actually pruned at almost every update
        # after the prune window the density is the final one
        assert hooks.prunes[-1][2] == round(0.1 * n_total)
        assert [p[3] for p in hooks.prunes if p[0] >= plan.prune_end] == [round(0.1 * n_total)] * 3


def test_dense_layer_is_left_unchanged_by_an_update() -> None:
    """A layer ERK made dense can only regrow what it just dropped: nothing may be reset."""
    from sparse_sup.core.masks import MaskState as State
    from sparse_sup.core.targets import Target

    w = torch.randn(6, 5)
    before = w.clone()
    target = Target(name="dense.weight", param=w, shape=(6, 5))
    state = State({"dense.weight": torch.ones(6, 5, dtype=torch.bool)})
    scores = {"dense.weight": torch.rand(6, 5)}
    drop_and_grow([target], state, 0.5, "gradient", step=1, seed=0, collectives=LOCAL, grad_scores=scores)
    assert torch.equal(w, before) and bool(state.masks["dense.weight"].all())
