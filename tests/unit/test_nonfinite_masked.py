"""inf/NaN at masked positions cannot survive a step: masks are applied with fill semantics
(``0 * nan`` is nan, so multiplication would keep them in a weight or optimizer state for good).

Drives the real engine and the real step code (``LocalBackend`` + ``TorchOptimizerStep``) with a
real optimizer and ``train.skip_nonfinite=false``, so the poisoned step is taken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy_models import SmallCNN

from sparse_sup.backends import LocalBackend, StepOptions
from sparse_sup.config import load_config, resolve_plan
from sparse_sup.core.masks import MaskState, zero_outside
from sparse_sup.core.topology import drop_and_grow
from sparse_sup.engine import SupTicketsEngine
from sparse_sup.tickets import SuperpositionChain

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
}


def _poison(x: torch.Tensor, keep: torch.Tensor) -> None:
    """NaN at half of the masked positions, +inf / -inf at the others."""
    off = (~keep).reshape(-1).nonzero()[:, 0]
    flat = x.view(-1)
    flat[off[0::3]] = float("nan")
    flat[off[1::3]] = float("inf")
    flat[off[2::3]] = float("-inf")


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_nonfinite_at_masked_positions_is_zero_after_the_step(name):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = OPTIMIZERS[name](model.parameters())
    cfg = load_config(None, ["--train.skip_nonfinite=false", "--sparse.update_interval=1000"])
    plan = resolve_plan(cfg, 64 * 100)
    backend = LocalBackend(model, opt, SmallCNN.TARGETS, options=StepOptions(skip_nonfinite=False))
    engine = SupTicketsEngine.from_config(cfg, plan, backend)
    engine.init_masks()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))

    def backward() -> None:
        backend.backward(F.cross_entropy(model(x), y), 1)

    backward()
    assert backend.optimizer_step()  # creates the optimizer state (momentum / Adam moments)
    targets = engine.targets
    states = {t.name: t.optimizer_states() for t in targets}
    assert all(len(s) == (1 if name == "sgd" else 2) for s in states.values())

    backward()
    for t in targets:  # poison weights, gradients and optimizer state at masked positions
        keep = engine.masks.masks[t.name]
        for tensor in [t.param, t.grad(), *states[t.name]]:
            _poison(tensor, keep)
    seen_grads = {}
    hook = opt.register_step_pre_hook(
        lambda *_: seen_grads.update({t.name: t.grad().clone() for t in targets})
    )
    assert backend.optimizer_step()  # skip_nonfinite=false: the step is taken
    hook.remove()
    assert engine.step == 2
    for t in targets:
        keep = engine.masks.masks[t.name]
        assert torch.equal(seen_grads[t.name][~keep], torch.zeros_like(t.param[~keep])), t.name
        for tensor in [t.param, *states[t.name]]:
            assert torch.equal(tensor[~keep], torch.zeros_like(tensor[~keep])), t.name
            assert bool(torch.isfinite(tensor[keep]).all()), t.name  # nothing leaked into active ones
    # and training goes on with finite losses
    backward()
    assert backend.optimizer_step()
    assert torch.isfinite(F.cross_entropy(model(x), y))


def test_topology_update_and_reprune_zero_nonfinite():
    torch.manual_seed(1)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    targets = LocalBackend(model, opt, SmallCNN.TARGETS).targets()
    state = MaskState.initialize(targets, 0.3, "uniform", seed=0)
    before = {t.name: state.masks[t.name].clone() for t in targets}
    for t in targets:  # inactive weights must be 0; their optimizer state got corrupted
        for s in t.optimizer_states():
            _poison(s, before[t.name])
    drop_and_grow(targets, state, 0.5, "random", step=10, seed=0, collectives=state.collectives)
    for t in targets:
        keep = state.masks[t.name]
        grown = keep & ~before[t.name]
        assert grown.any()
        for s in t.optimizer_states():  # new weights start with zero state; inactive ones stay zero
            assert torch.equal(s[grown | ~keep], torch.zeros_like(s[grown | ~keep]))

    # re-prune: more infinite values than the budget keeps; those left out must become 0, not NaN
    chain = SuperpositionChain()
    chain.merge({t.name: t.param for t in targets})
    for v in chain.tensors.values():
        v.fill_(float("inf"))
    chain.reprune(targets, 5, state.collectives)
    assert sum(int(m.sum()) for m in chain.masks.values()) == 5
    for t in targets:
        m, v = chain.masks[t.name], chain.tensors[t.name]
        assert torch.equal(v[~m], torch.zeros_like(v[~m])), t.name


@pytest.mark.parametrize(
    "dtype, bits",
    [
        (torch.float32, torch.int32),
        (torch.float64, torch.int64),
        (torch.float16, torch.int16),
        (torch.bfloat16, torch.int16),
    ],
)
def test_zero_outside_is_an_exact_fill(dtype, bits):
    """Masked positions become +0.0 whatever they held (NaN, ±inf, -0.0); kept ones keep their bits,
    on contiguous tensors and on strided views (a transposed weight, a slice of a flat buffer)."""
    torch.manual_seed(2)
    base = torch.randn(48, 40).to(dtype)
    keep = torch.rand(48, 40) < 0.3
    _poison(base, keep)
    base[0][~keep[0]] = -0.0  # the sign bit must go too ...
    base[1][keep[1]] = -0.0  # ... and stay where kept
    cases = [
        (base.clone(), keep),
        (base.clone().t(), keep.t()),
        (base.clone().view(-1)[7:407], keep.view(-1)[7:407]),
    ]
    for x, m in cases:
        before = x.clone()
        zero_outside([x], [m])
        assert torch.equal(x.view(bits)[~m], torch.zeros_like(x.view(bits)[~m]))  # all bits clear: +0.0
        assert torch.equal(x.view(bits)[m], before.view(bits)[m])
