"""The superposition side chain (CAA / EMA merge, exact global re-prune, in-place swap) and
BatchNorm recalibration with exact pooled statistics."""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from sparse_sup.core.collectives import LOCAL
from sparse_sup.core.targets import Target
from sparse_sup.tickets import MERGE_RULES, Discard, SuperpositionChain, recalibrate_batchnorm

NAMES = ["a.weight", "a.bias", "b.weight", "counter"]
TARGET_NAMES = ["a.weight", "b.weight"]
SHAPES = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (5,), "counter": ()}


def model_tensors(values: dict[str, list]) -> list[torch.Tensor]:
    """Float64 tensors for the three float entries, an int64 scalar for ``counter``."""
    out = []
    for name in NAMES:
        if name == "counter":
            out.append(torch.tensor(values[name], dtype=torch.int64))
        else:
            out.append(torch.tensor([float(v) for v in values[name]], dtype=torch.float64).view(SHAPES[name]))
    return out


def targets_for(tensors: list[torch.Tensor]) -> list[Target]:
    by_name = dict(zip(NAMES, tensors, strict=True))
    return [Target(name=n, param=by_name[n], shape=tuple(by_name[n].shape)) for n in TARGET_NAMES]


def hand_prune(state: dict[str, list[Fraction]], keep: int) -> dict[str, list[Fraction]]:
    """Keep the ``keep`` largest |v| over the target tensors viewed as one vector in target order,
    ties to the lowest global index (exact, in rationals)."""
    flat = [(abs(v), i) for i, v in enumerate(state["a.weight"] + state["b.weight"])]
    chosen = {i for _, i in sorted(flat, key=lambda p: (-p[0], p[1]))[:keep]}
    n_a = len(state["a.weight"])
    out = dict(state)
    out["a.weight"] = [v if i in chosen else Fraction(0) for i, v in enumerate(state["a.weight"])]
    out["b.weight"] = [v if n_a + i in chosen else Fraction(0) for i, v in enumerate(state["b.weight"])]
    return out


def threshold_is_tied(state: dict[str, list[Fraction]], keep: int) -> bool:
    mags = sorted((abs(v) for v in state["a.weight"] + state["b.weight"]), reverse=True)
    return mags[keep - 1] == mags[keep]


# --- CAA with re-prune -------------------------------------------------------------------------
def _designed_models() -> list[dict[str, list]]:
    """P, T1, T2, T3 over 17 target weights: 5 'large' (|v| = 4 always), 6 'tied' (|v| = 1 in P
    and T1, and values that make every S_i tie there again), the rest small (|v| <= 1/4).
    With keep = 8, every re-prune must break a tie inside the tied group by global index."""
    n = 17
    large = [2, 7, 13, 0, 15]
    tied = [1, 4, 9, 11, 12, 16]  # spans both tensors (a.weight is global 0..11)
    sign = {i: (-1 if i in (4, 12) else 1) for i in tied}
    models = []
    for m in range(4):
        g = torch.Generator().manual_seed(m)
        small = (torch.randint(-1, 2, (n,), generator=g) * 0.25).tolist()
        v: list = [Fraction(s).limit_denominator(4) for s in small]
        for i in large:
            v[i] = Fraction(4 * (1 if i % 2 else -1))
        models.append(v)
    # P and T1: all tied positions at +-1; T_i for i >= 2: (i+1) where S_{i-1} pruned them, else 1
    for m in (0, 1):
        for i in tied:
            models[m][i] = Fraction(sign[i])
    kept_after_1 = sorted(tied)[:3]  # the three lowest global indices win the tie
    for m in (2, 3):
        for i in tied:
            models[m][i] = Fraction(sign[i] * (1 if i in kept_after_1 else m + 1))
    out = []
    for m, v in enumerate(models):
        bias = [Fraction(m * 3 + j, 4) for j in range(3)]
        out.append({"a.weight": v[:12], "b.weight": v[12:], "a.bias": bias, "counter": 10 + m})
    return out


def test_caa_with_reprune_matches_hand_recursion_with_ties() -> None:
    models = _designed_models()
    density = 0.5
    keep = math.floor(density * 17)
    assert keep == 8
    chain = SuperpositionChain(rule="caa")
    live = model_tensors(models[0])  # the "model" whose tensors are merged
    targets = targets_for(live)
    chain.merge(dict(zip(NAMES, live)))  # S_0 = P (not pruned)
    hand = {k: (list(v) if isinstance(v, list) else v) for k, v in models[0].items()}
    ties_seen = 0
    for i in (1, 2, 3):
        for t, new in zip(live, model_tensors(models[i]), strict=True):
            t.copy_(new)
        chain.merge(dict(zip(NAMES, live)))
        a, b = Fraction(i, i + 1), Fraction(1, i + 1)
        merged = {
            k: (
                models[i][k]
                if k == "counter"
                else [a * s + b * x for s, x in zip(hand[k], models[i][k], strict=True)]
            )
            for k in hand
        }
        ties_seen += threshold_is_tied(merged, keep)
        chain.reprune(targets, keep, LOCAL)
        hand = hand_prune(merged, keep)
        got = chain.tensors
        for k in ("a.weight", "b.weight", "a.bias"):
            expected = torch.tensor([float(v) for v in hand[k]], dtype=torch.float64).view(SHAPES[k])
            assert torch.allclose(got[k], expected, rtol=0, atol=1e-12), (i, k)
        for k in TARGET_NAMES:
            expected_mask = torch.tensor([v != 0 for v in hand[k]]).view(SHAPES[k])
            assert torch.equal(chain.masks[k], expected_mask), (i, k)
        assert sum(int(m.sum()) for m in chain.masks.values()) == keep
        assert int(got["counter"]) == 10 + i  # integer buffers follow the latest model
        assert chain.num_merged == i + 1
    assert ties_seen == 3  # the construction really tied at the threshold every time
    # and the model's own tensors were never modified by the chain
    assert torch.equal(live[0], model_tensors(models[3])[0])


def test_caa_random_float_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    models = [
        [
            torch.randn(SHAPES[n], generator=g, dtype=torch.float64) if n != "counter" else torch.tensor(m)
            for n in NAMES
        ]
        for m in range(4)
    ]
    chain = SuperpositionChain(rule="caa")
    chain.merge(dict(zip(NAMES, models[0])))
    targets = targets_for(models[0])
    keep = math.floor(0.3 * 17)
    s = [t.clone() for t in models[0]]
    for i in (1, 2, 3):
        chain.merge(dict(zip(NAMES, models[i])))
        chain.reprune(targets, keep, LOCAL)
        s = [
            (i / (i + 1)) * a + (1 / (i + 1)) * b if a.is_floating_point() else b.clone()
            for a, b in zip(s, models[i], strict=True)
        ]
        flat = torch.cat([s[0].reshape(-1), s[2].reshape(-1)])
        order = torch.sort(-flat.abs(), stable=True).indices[:keep]
        mask = torch.zeros(17, dtype=torch.bool)
        mask[order] = True
        s[0] = s[0] * mask[:12].view(3, 4)
        s[2] = s[2] * mask[12:]
        for a, b in zip([chain.tensors[n] for n in NAMES], s, strict=True):
            assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-12)
        assert torch.equal(chain.masks["a.weight"], mask[:12].view(3, 4))
        assert torch.equal(chain.masks["b.weight"], mask[12:])


def test_ema_rule() -> None:
    g = torch.Generator().manual_seed(1)
    models = [[torch.randn(4, generator=g, dtype=torch.float64), torch.tensor(m)] for m in range(4)]
    chain = SuperpositionChain(rule="ema", ema_ticket_weight=0.3)  # the NEW ticket gets weight 0.3
    expected = models[0][0].clone()
    for i, m in enumerate(models):
        chain.merge(dict(zip("wn", m)))
        if i:
            expected = 0.7 * expected + 0.3 * m[0]
        assert torch.allclose(chain.tensors["w"], expected, rtol=0, atol=1e-12)
        assert int(chain.tensors["n"]) == i
    # the chain owns copies: changing the model afterwards does not touch S
    models[-1][0].add_(100.0)
    assert torch.allclose(chain.tensors["w"], expected, rtol=0, atol=1e-12)
    assert MERGE_RULES == ("caa", "ema")
    with pytest.raises(ValueError, match="unknown merge rule 'mean'"):
        SuperpositionChain(rule="mean")


def test_swap_exchanges_contents_in_place() -> None:
    chain = SuperpositionChain()
    model = [torch.arange(6, dtype=torch.float32).view(2, 3), torch.tensor(3)]
    named = dict(zip("wn", model))
    chain.merge(named)
    chain.tensors["w"].mul_(-1)
    chain.tensors["n"].fill_(9)
    ptr_model = [t.data_ptr() for t in model]
    ptr_chain = [t.data_ptr() for t in chain.tensors.values()]
    chain.swap(named)
    assert torch.equal(model[0], -torch.arange(6, dtype=torch.float32).view(2, 3))
    assert int(model[1]) == 9
    assert torch.equal(chain.tensors["w"], torch.arange(6, dtype=torch.float32).view(2, 3))
    assert int(chain.tensors["n"]) == 3
    assert [t.data_ptr() for t in model] == ptr_model
    assert [t.data_ptr() for t in chain.tensors.values()] == ptr_chain
    chain.swap(named)  # swapping twice restores both
    assert torch.equal(model[0], torch.arange(6, dtype=torch.float32).view(2, 3)) and int(model[1]) == 3
    # a real parameter: its storage is kept too
    lin = nn.Linear(3, 2)
    chain2 = SuperpositionChain()
    tensors = {"weight": lin.weight.detach(), "bias": lin.bias.detach()}
    chain2.merge(tensors)
    chain2.tensors["weight"].zero_()
    ptr = lin.weight.data_ptr()
    chain2.swap(tensors)
    assert lin.weight.data_ptr() == ptr and bool((lin.weight == 0).all())


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 0.9])
def test_reprune_exact_count_with_ties(density: float, caplog: pytest.LogCaptureFixture) -> None:
    tensors = [
        torch.full((3, 4), 2.0, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
        torch.full((5,), -2.0, dtype=torch.float64),
        torch.tensor(0),
    ]
    chain = SuperpositionChain()
    chain.merge(dict(zip(NAMES, tensors)))
    keep = math.floor(density * 17)
    chain.reprune(targets_for(tensors), keep, LOCAL)
    flat_mask = torch.cat([chain.masks["a.weight"].reshape(-1), chain.masks["b.weight"].reshape(-1)])
    assert int(flat_mask.sum()) == keep
    assert flat_mask.tolist() == [i < keep for i in range(17)]  # all tie: lowest global indices
    a, b = chain.tensors["a.weight"], chain.tensors["b.weight"]
    assert int((a != 0).sum() + (b != 0).sum()) == keep
    # more to keep than there are non-zeros (frozen masks, no re-exploration): S keeps its nonzero
    # support instead of marking the lowest-index zeros active to fill the budget
    chain = SuperpositionChain()
    sparse = [
        torch.zeros(3, 4, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
        torch.tensor([0.0, 1.0, 0.0, -3.0, 0.0], dtype=torch.float64),
        torch.tensor(0),
    ]
    chain.merge(dict(zip(NAMES, sparse)))
    with caplog.at_level(logging.WARNING, logger="sparse_sup.tickets.superpose"):
        chain.reprune(targets_for(sparse), 5, LOCAL)
    assert "2 nonzero target weights, fewer than the budget 5" in caplog.text
    assert sum(int(m.sum()) for m in chain.masks.values()) == 2
    assert chain.masks["b.weight"].tolist() == [False, True, False, True, False]
    assert not chain.masks["a.weight"].any()
    assert chain.tensors["b.weight"].tolist() == [0.0, 1.0, 0.0, -3.0, 0.0]  # values untouched


# --- BatchNorm recalibration -------------------------------------------------------------------
def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    return [torch.randn(n, 3, 4, 4, generator=g) * (1 + i) + shift for i, n in enumerate((5, 7, 4))]


def _bn_first_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    model[0].running_mean.fill_(123.0)  # garbage that must be overwritten, not averaged with
    model[0].running_var.fill_(77.0)
    return model


def test_bn_recalibration_pooled_statistics() -> None:
    batches = _batches()
    data = torch.cat(batches).double()
    mean = data.mean((0, 2, 3))
    var = data.var((0, 2, 3), unbiased=True)
    model = _bn_first_model()
    model.eval()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    junk = torch.full((6, 3, 4, 4), 1000.0)  # run forward (lockstep) but never counted
    assert recalibrate_batchnorm(model, [batches[0], Discard(junk), batches[1], batches[2]]) == 2
    bn = model[0]
    assert torch.allclose(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-6, atol=1e-6)
    # not the biased variance, not the mean of per-batch statistics
    biased = data.var((0, 2, 3), unbiased=False)
    assert not torch.allclose(bn.running_var.double(), biased, rtol=1e-6, atol=1e-6)
    per_batch = torch.stack([b.double().mean((0, 2, 3)) for b in batches]).mean(0)
    assert not torch.allclose(bn.running_mean.double(), per_batch, rtol=1e-4, atol=1e-4)
    assert int(bn.num_batches_tracked) == 3  # Discard batches are not counted
    assert not model.training  # the mode is restored
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_bn_recalibration_large_mean_small_spread() -> None:
    """Channels far from zero with a small spread: E[x^2] - E[x]^2 in float32 would cancel to
    garbage; per-batch moments pooled in float64 keep the variance to float32 accuracy."""
    torch.manual_seed(3)
    batches = [1000.0 + 0.01 * torch.randn(8, 2, 5, 5) for _ in range(3)]
    data = torch.cat(batches).double()
    bn = nn.BatchNorm2d(2)
    recalibrate_batchnorm(bn, batches)
    assert torch.allclose(bn.running_mean.double(), data.mean((0, 2, 3)), rtol=1e-7, atol=0)
    assert torch.allclose(bn.running_var.double(), data.var((0, 2, 3)), rtol=1e-3, atol=0)


def test_bn_recalibration_independent_of_batching_and_repeatable() -> None:
    batches = _batches()
    split, whole, again = _bn_first_model(), _bn_first_model(), _bn_first_model()
    recalibrate_batchnorm(split, batches)
    recalibrate_batchnorm(whole, [torch.cat(batches)])
    assert torch.allclose(split[0].running_mean, whole[0].running_mean, rtol=1e-6, atol=1e-7)
    assert torch.allclose(split[0].running_var, whole[0].running_var, rtol=1e-6, atol=1e-7)
    # a second recalibration with the same batches gives the same statistics (no accumulation)
    recalibrate_batchnorm(again, batches)
    recalibrate_batchnorm(again, batches)
    assert torch.equal(again[0].running_mean, split[0].running_mean)
    assert torch.equal(again[0].running_var, split[0].running_var)
    assert torch.equal(again[2].running_mean, split[2].running_mean)
    assert again.training  # was in train mode, stays in train mode


def test_bn1d_and_custom_forward() -> None:
    g = torch.Generator().manual_seed(2)
    batches = [{"x": torch.randn(n, 6, generator=g) + 3.0} for n in (3, 8, 5)]
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 2))
    assert recalibrate_batchnorm(model, batches, forward=lambda b: model(b["x"])) == 1
    data = torch.cat([b["x"] for b in batches]).double()
    assert torch.allclose(model[0].running_mean.double(), data.mean(0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(model[0].running_var.double(), data.var(0, unbiased=True), rtol=1e-6, atol=1e-6)


def test_bn_recalibration_needs_two_values_per_channel() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="saw 0 values per channel"):
        recalibrate_batchnorm(model, [Discard(torch.randn(4, 3))])


def test_model_without_bn_returns_zero_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.LayerNorm(3))
    calls = []
    with caplog.at_level(logging.INFO, logger="sparse_sup.tickets.batchnorm"):
        n = recalibrate_batchnorm(model, [torch.randn(2, 3)], forward=lambda b: calls.append(b))
    assert n == 0
    assert calls == []  # nothing was run
    assert any("no BatchNorm" in r.getMessage() for r in caplog.records)
