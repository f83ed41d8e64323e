"""Per-layer density allocation: ERK (Erdős–Rényi-Kernel) or uniform, with exact counts."""

from __future__ import annotations

import math
from collections.abc import Sequence

DISTRIBUTIONS = ("erk", "uniform")


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """ERK: layer score sum(shape)/prod(shape), one factor solved so the kept total is
    density * N; layers that would exceed 1 become dense and the factor is re-solved."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    total_keep = density * sum(sizes)
    dense: set[int] = set()
    while True:
        budget = total_keep - sum(sizes[i] for i in dense)
        weight = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        if weight == 0:
            break
        eps = budget / weight
        over = [i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    return [1.0 if i in dense else min(1.0, eps * raw[i]) for i in range(len(sizes))]


def layer_counts(shapes: Sequence[Sequence[int]], density: float, distribution: str) -> list[int]:
    """Number of weights each layer keeps: round(d_l * n_l), at least 1."""
    if distribution == "erk":
        densities = erk_densities(shapes, density)
    elif distribution == "uniform":
        densities = [density] * len(shapes)
    else:
        raise ValueError(f"unknown density distribution {distribution!r}; allowed: {DISTRIBUTIONS}")
    return [max(1, min(math.prod(s), round(d * math.prod(s)))) for d, s in zip(densities, shapes)]
