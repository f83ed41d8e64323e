"""Exact top-k selection (sparse_sup.core.select) against a stable-sort reference.

Every selection must equal a stable sort of the group's eligible scores laid out in global flat
index order (descending for ``largest``), so ties go to the lowest global index, -0.0 ties +0.0,
and the answer does not depend on how a group is split into pieces.
"""

from __future__ import annotations

import random

import pytest
import torch

from sparse_sup.core.select import Piece, key_bits, ordered_keys, top_k_masks

DTYPES = [torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_thread")


# --- reference ---------------------------------------------------------------------------------
def reference_mask(
    values: torch.Tensor, k: int, largest: bool = True, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """Stable sort of the eligible elements in index order; the first k win."""
    flat = values.reshape(-1).to(torch.float64)
    elig = torch.ones_like(flat, dtype=torch.bool) if eligible is None else eligible.reshape(-1)
    idx = elig.nonzero()[:, 0]
    key = (-flat[idx] if largest else flat[idx]) + 0.0  # + 0.0: -0.0 and +0.0 compare equal anyway
    order = torch.sort(key, stable=True).indices
    mask = torch.zeros_like(elig)
    mask[idx[order[:k]]] = True
    return mask.view(values.shape)


def split_points(n: int, parts: int, rng: random.Random) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering [0, n), some possibly empty."""
    cuts = sorted(rng.randint(0, n) for _ in range(parts - 1))
    bounds = [0, *cuts, n]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def select_split(
    values: torch.Tensor,
    k: int,
    parts: int,
    rng: random.Random,
    largest: bool = True,
    eligible: torch.Tensor | None = None,
    base: int = 0,
    shuffle: bool = True,
) -> torch.Tensor:
    """Run top_k_masks on ``values`` split into ``parts`` pieces of one group; reassemble."""
    flat = values.reshape(-1)
    elig = None if eligible is None else eligible.reshape(-1)
    pieces = [
        Piece(flat[a:b], 0, base + a, None if elig is None else elig[a:b])
        for a, b in split_points(flat.numel(), parts, rng)
    ]
    order = list(range(len(pieces)))
    if shuffle:
        rng.shuffle(order)
    masks = top_k_masks([pieces[i] for i in order], [k], largest=largest)
    full = torch.zeros(flat.numel(), dtype=torch.bool)
    for i, m in zip(order, masks, strict=True):
        p = pieces[i]
        assert m.dtype == torch.bool and m.shape == p.scores.shape
        full[p.offset - base : p.offset - base + m.numel()] = m
    return full.view(values.shape)


def check_against_topk(
    values: torch.Tensor, mask: torch.Tensor, k: int, largest: bool, eligible: torch.Tensor | None = None
) -> None:
    """The selected values are exactly the values torch.topk returns (as a multiset)."""
    flat = values.reshape(-1)
    pool = flat if eligible is None else flat[eligible.reshape(-1)]
    expected = torch.topk(pool, k, largest=largest).values.sort().values
    got = flat[mask.reshape(-1)].sort().values
    assert int(mask.sum()) == k
    assert torch.equal(got, expected)


# --- ordered keys ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_ordered_keys_follow_float_order(dtype: torch.dtype) -> None:
    special = torch.tensor(
        [float("-inf"), -1e30, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 1e30, float("inf")], dtype=dtype
    )
    x = torch.cat([special, torch.randn(500, dtype=dtype) * 10, torch.randint(-3, 4, (100,)).to(dtype)])
    bits = key_bits(dtype)
    keys = ordered_keys(x, bits)
    # compare as unsigned: shift the int64 keys into signed order
    shift = -(2**63) if bits == 64 else 0
    signed = keys ^ shift if bits == 64 else keys
    assert bits == (64 if dtype == torch.float64 else 32)
    for i in range(0, x.numel(), 7):
        less = (x < x[i]) == (signed < signed[i])
        equal = (x == x[i]) == (signed == signed[i])
        assert bool(less.all()) and bool(equal.all())
    assert int(ordered_keys(torch.tensor([-0.0], dtype=dtype), bits)) == int(
        ordered_keys(torch.tensor([0.0], dtype=dtype), bits)
    )


# --- agreement with the stable-sort reference --------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["random", "ties", "all_equal", "signed_zeros", "with_inf"])
def test_matches_stable_sort_reference(dtype: torch.dtype, largest: bool, kind: str) -> None:
    g = torch.Generator().manual_seed(hash((str(dtype), largest, kind)) % 2**31)
    rng = random.Random(7)
    n = 1000
    if kind == "random":
        values = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    elif kind == "ties":
        values = torch.randint(-3, 4, (n,), generator=g).to(dtype)
    elif kind == "all_equal":
        values = torch.full((n,), 0.5, dtype=dtype)
    elif kind == "signed_zeros":
        sign = torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1
        values = sign * 0.0
        values[::17] = 1.0
        values[5::23] = -1.0
        zero = values == 0
        assert bool((torch.signbit(values) & zero).any()) and bool((~torch.signbit(values) & zero).any())
    else:
        values = torch.randint(-2, 3, (n,), generator=g).to(dtype)
        values[::11] = float("inf")
        values[3::13] = float("-inf")
    values = values.view(25, 40)
    for k in [0, 1, 7, 100, 333, 500, 999, 1000]:
        expected = reference_mask(values, k, largest)
        got = top_k_masks([Piece(values, 0, 0)], [k], largest=largest)[0]
        assert got.shape == values.shape
        assert torch.equal(got, expected), (kind, k)
        check_against_topk(values, got, k, largest)
        # the same data split into pieces, in shuffled order
        split = select_split(values, k, 5, rng, largest)
        assert torch.equal(split, expected), (kind, k)


def test_signed_zeros_tie_to_lowest_index() -> None:
    # +0.0 and -0.0 are equal scores: the lowest indices win, whatever the sign bit
    values = torch.tensor([-0.0, 0.0, -0.0, 0.0, -0.0, 1.0])
    assert top_k_masks([Piece(values, 0, 0)], [3])[0].tolist() == [True, True, False, False, False, True]
    smallest = top_k_masks([Piece(values, 0, 0)], [2], largest=False)[0]
    assert smallest.tolist() == [True, True, False, False, False, False]
    values = torch.tensor([0.0, -0.0, 0.0, -0.0])
    for k in range(5):
        got = top_k_masks([Piece(values, 0, 0)], [k], largest=False)[0]
        assert got.tolist() == [i < k for i in range(4)]


def test_ties_go_to_lowest_global_index_across_pieces() -> None:
    # two pieces of one group whose list order is reversed: offsets decide, not piece order
    a = Piece(torch.tensor([5.0, 5.0, 1.0]), 0, 3)
    b = Piece(torch.tensor([5.0, 2.0, 5.0]), 0, 0)
    ma, mb = top_k_masks([a, b], [3])
    # global order: [5, 2, 5, 5, 5, 1] -> the 5s at global 0, 2, 3 win
    assert mb.tolist() == [True, False, True]
    assert ma.tolist() == [True, False, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores(dtype: torch.dtype) -> None:
    values = torch.randint(-4, 5, (300,)).to(dtype)
    for largest in (True, False):
        for k in (0, 10, 150, 300):
            got = top_k_masks([Piece(values, 0, 0)], [k], largest=largest)[0]
            assert torch.equal(got, reference_mask(values, k, largest))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [True, False])
def test_eligible_masks(dtype: torch.dtype, largest: bool) -> None:
    g = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    for kind in ("random", "ties"):
        values = (
            torch.randn(600, generator=g, dtype=torch.float64)
            if kind == "random"
            else torch.randint(0, 3, (600,), generator=g)
        ).to(dtype)
        eligible = torch.rand(600, generator=g) < 0.4
        n_elig = int(eligible.sum())
        for k in (0, 1, n_elig // 3, n_elig - 1, n_elig):
            expected = reference_mask(values, k, largest, eligible)
            got = top_k_masks([Piece(values, 0, 0, eligible)], [k], largest=largest)[0]
            assert torch.equal(got, expected)
            assert not bool((got & ~eligible).any())
            check_against_topk(values, got, k, largest, eligible)
            assert torch.equal(select_split(values, k, 4, rng, largest, eligible), expected)
    # an ineligible score that would win is never selected
    values = torch.tensor([100.0, 1.0, 2.0, 3.0])
    got = top_k_masks([Piece(values, 0, 0, torch.tensor([False, True, True, True]))], [2])[0]
    assert got.tolist() == [False, False, True, True]


def test_zero_size_pieces() -> None:
    empty = torch.zeros(0)
    values = torch.tensor([3.0, 1.0, 2.0])
    pieces = [Piece(empty, 0, 0), Piece(values, 0, 0), Piece(empty, 0, 3), Piece(empty, 1, 0)]
    masks = top_k_masks(pieces, [2, 0])
    assert [m.numel() for m in masks] == [0, 3, 0, 0]
    assert masks[1].tolist() == [True, False, True]
    # a group made only of empty pieces with k = 0
    assert top_k_masks([Piece(empty, 0, 0)], [0])[0].numel() == 0
    # no pieces at all
    assert top_k_masks([], []) == []


@pytest.mark.parametrize("largest", [True, False])
def test_multiple_groups_in_one_call(largest: bool) -> None:
    g = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    groups = [
        torch.randn(40, 30, generator=g),  # k = 0
        torch.randint(-2, 3, (500,), generator=g).float(),  # k = all
        torch.randn(7, generator=g),  # k = some
        torch.full((64,), 2.0),  # all equal, k in the middle
        torch.randint(0, 2, (3, 3, 5), generator=g).float() * 0.0 * -1,  # signed zeros only
    ]
    eligibles = [None, None, None, torch.arange(64) % 3 != 0, None]
    ks = [0, 500, 3, 20, 13]
    pieces = []
    for gi, (v, e) in enumerate(zip(groups, eligibles, strict=True)):
        flat, ef = v.reshape(-1), None if e is None else e.reshape(-1)
        for a, b in split_points(flat.numel(), rng.randint(1, 4), rng):
            pieces.append(Piece(flat[a:b], gi, a, None if ef is None else ef[a:b]))
    rng.shuffle(pieces)
    masks = top_k_masks(pieces, ks, largest=largest)
    for gi, (v, e, k) in enumerate(zip(groups, eligibles, ks, strict=True)):
        full = torch.zeros(v.numel(), dtype=torch.bool)
        for p, m in zip(pieces, masks, strict=True):
            if p.group == gi:
                full[p.offset : p.offset + m.numel()] = m
        assert int(full.sum()) == k
        assert torch.equal(full, reference_mask(v.reshape(-1), k, largest, e)), gi
    # each group alone gives the same answer as in the joint call
    for v, e, k in zip(groups, eligibles, ks, strict=True):
        alone = top_k_masks([Piece(v, 0, 0, e)], [k], largest=largest)[0]
        assert torch.equal(alone.reshape(-1), reference_mask(v.reshape(-1), k, largest, e))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_result_independent_of_piece_split(dtype: torch.dtype, kind: str) -> None:
    g = torch.Generator().manual_seed(5)
    values = (
        torch.randn(2000, generator=g, dtype=torch.float64)
        if kind == "random"
        else torch.randint(-1, 2, (2000,), generator=g)
    ).to(dtype)
    eligible = torch.rand(2000, generator=g) < 0.7
    base = 2**40  # global offsets far above 2**32 exercise the upper index digits
    for largest in (True, False):
        for k in (1, 345, int(eligible.sum()) - 2):
            results = []
            for parts in (1, 2, 3, 7):
                rng = random.Random(parts * 31 + k)
                results.append(select_split(values, k, parts, rng, largest, eligible, base=base))
            for r in results[1:]:
                assert torch.equal(r, results[0])
            assert torch.equal(results[0], reference_mask(values, k, largest, eligible))


def test_pieces_with_explicit_empty_middle_and_edges() -> None:
    values = torch.randint(0, 3, (50,)).float()
    expected = reference_mask(values, 20)
    pieces = [
        Piece(values[:0], 0, 0),
        Piece(values[:10], 0, 0),
        Piece(values[10:10], 0, 10),
        Piece(values[10:49], 0, 10),
        Piece(values[49:], 0, 49),
        Piece(values[50:], 0, 50),
    ]
    masks = top_k_masks(pieces[::-1], [20])[::-1]
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), expected)


def test_randomized_against_reference() -> None:
    rng = random.Random(1234)
    torch.manual_seed(1234)
    for _ in range(60):
        dtype = rng.choice(DTYPES)
        n = rng.choice([1, 2, 9, 64, 300])
        kind = rng.choice(["rand", "int", "eq"])
        values = {
            "rand": torch.randn(n, dtype=torch.float64),
            "int": torch.randint(-2, 3, (n,)).double(),
            "eq": torch.zeros(n, dtype=torch.float64),
        }[kind].to(dtype)
        eligible = torch.rand(n) < rng.random() if rng.random() < 0.5 else None
        n_elig = n if eligible is None else int(eligible.sum())
        k = rng.randint(0, n_elig)
        largest = rng.random() < 0.5
        base = rng.choice([0, 99, 2**33])
        got = select_split(values, k, rng.randint(1, 6), rng, largest, eligible, base=base)
        assert torch.equal(got, reference_mask(values, k, largest, eligible))


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_raises(dtype: torch.dtype) -> None:
    values = torch.randn(20, dtype=dtype)
    values[7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        top_k_masks([Piece(values, 0, 0)], [3])
    with pytest.raises(ValueError, match="NaN"):
        top_k_masks([Piece(values[:10], 0, 0), Piece(values[10:], 0, 10)], [3], largest=False)


def test_k_larger_than_eligible_raises_with_message() -> None:
    values = torch.randn(10)
    with pytest.raises(ValueError, match=r"asked for 11 elements of group 0, which has only 10 eligible"):
        top_k_masks([Piece(values, 0, 0)], [11])
    eligible = torch.zeros(10, dtype=torch.bool)
    eligible[:4] = True
    with pytest.raises(ValueError, match=r"asked for 5 elements of group 1, which has only 4 eligible"):
        top_k_masks([Piece(values, 0, 0), Piece(values, 1, 0, eligible)], [2, 5])
    with pytest.raises(ValueError, match="k >= 0"):
        top_k_masks([Piece(values, 0, 0)], [-1])


def test_index_range_checked() -> None:
    with pytest.raises(ValueError, match="2\\*\\*48"):
        top_k_masks([Piece(torch.randn(4), 0, 2**48 - 2)], [1])
    # just below the limit is fine and exact
    values = torch.tensor([1.0, 1.0, 1.0, 0.0])
    got = top_k_masks([Piece(values, 0, 2**48 - 4)], [2])[0]
    assert got.tolist() == [True, True, False, False]
