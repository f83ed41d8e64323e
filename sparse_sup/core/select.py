"""Exact top-k over tensors that may be split across ranks, without gathering them.

A selection problem is a list of *pieces*: local, contiguous runs of elements, each belonging to a
*group* (a layer for per-layer selection, one group for a global selection) and starting at a known
global flat index inside that group. For each group we select the k largest (or smallest) scores;
ties go to the lowest global flat index. The answer equals a stable sort of the group's
concatenation in global-index order, whatever the sharding.

How: scores are mapped to order-preserving unsigned integer keys and the k-th key is found by a
radix descent, 8 bits at a time. Each pass all-reduces one [groups, 256] count histogram, so ranks
exchange O(groups * 256) integers, never tensor data. Exact ties at the threshold are broken by a
second radix descent over the global index. Extra memory is O(local piece): candidates shrink to
~1/256 after the first pass on continuous data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .collectives import LOCAL, Collectives

_BINS = 256
_INDEX_BITS = 48  # global flat indices below 2**48


@dataclass
class Piece:
    """Local elements of one group. ``scores`` is a real tensor read in row-major order; element j
    has global flat index ``offset + j``; ``eligible`` (bool, same numel) limits the candidates,
    None meaning all."""

    scores: torch.Tensor
    group: int
    offset: int
    eligible: torch.Tensor | None = None


def key_bits(dtype: torch.dtype) -> int:
    """Width of the integer key used for a score dtype (float64 needs 64, narrower floats 32)."""
    return 64 if dtype == torch.float64 else 32


def ordered_keys(scores: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 keys whose unsigned order over ``bits`` bits equals the float order of ``scores``.

    -0.0 and +0.0 get the same key. Raises on NaN (diverged weights or gradients).
    """
    if bits == 64:
        x = scores.detach().reshape(-1).to(torch.float64) + 0.0  # + 0.0 turns -0.0 into +0.0
        raw, low, sign = x.view(torch.int64), 2**63 - 1, -(2**63)
    else:
        x = scores.detach().reshape(-1).to(torch.float32) + 0.0
        raw, low, sign = x.view(torch.int32).to(torch.int64), 2**31 - 1, 2**31
    if torch.isnan(x).any():
        raise ValueError("NaN in selection scores: the weights or gradients have diverged")
    signed_order = torch.where(raw < 0, raw ^ low, raw)
    return signed_order ^ sign  # flip the sign bit: signed order -> unsigned order


def _positions(candidates: torch.Tensor | None, condition: torch.Tensor) -> torch.Tensor:
    """Piece positions of the candidates where ``condition`` holds (None: all positions)."""
    return condition.nonzero()[:, 0] if candidates is None else candidates[condition]


def _radix_smallest(
    key_at: Callable[[int, torch.Tensor | None], torch.Tensor],
    sizes: Sequence[int],
    groups: Sequence[int],
    candidates: list[torch.Tensor | None],
    remaining: torch.Tensor,
    bits: int,
    collectives: Collectives,
) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Per group g, select the ``remaining[g]`` candidates with the smallest key.

    ``candidates[i]`` holds positions inside piece i (None: all). ``key_at(i, positions)`` gives the
    keys there. Returns the selected positions per piece and, per group, how many are still owed
    because of exact key ties; the tied positions are left in ``candidates`` (mutated).
    """
    num_groups = remaining.numel()
    device = remaining.device
    selected: list[list[torch.Tensor]] = [[] for _ in sizes]
    for shift in range(bits - 8, -1, -8):
        hist = torch.zeros(num_groups, _BINS, dtype=torch.int64, device=device)
        digits: list[torch.Tensor | None] = []
        for i, cand in enumerate(candidates):
            if (sizes[i] if cand is None else cand.numel()) == 0:
                digits.append(None)
                continue
            d = ((key_at(i, cand) >> shift) & 0xFF).to(torch.uint8)  # kept per piece: 1 byte each
            hist[groups[i]] += torch.bincount(d, minlength=_BINS)
            digits.append(d)
        collectives.all_reduce_sum(hist)
        cum_below = hist.cumsum(1)  # count with digit <= d
        # smallest digit whose cumulative count reaches what is still owed
        pivot = (cum_below < remaining[:, None]).sum(1).clamp(max=_BINS - 1)
        below = torch.where(pivot > 0, cum_below.gather(1, (pivot - 1).clamp(min=0)[:, None])[:, 0], 0)
        remaining = remaining - below
        at_pivot = hist.gather(1, pivot[:, None])[:, 0]
        resolved = (at_pivot == remaining) | (remaining == 0)
        undecided = at_pivot == hist.sum(1)  # every candidate shares this digit: nothing to filter
        for i, d in enumerate(digits):
            if d is None or (bool(undecided[groups[i]]) and not bool(resolved[groups[i]])):
                continue
            g, p = groups[i], int(pivot[groups[i]])
            selected[i].append(_positions(candidates[i], d < p))
            candidates[i] = _positions(candidates[i], d == p)
            if bool(resolved[g]):
                if int(remaining[g]) > 0:
                    selected[i].append(candidates[i])
                candidates[i] = candidates[i][:0]
        remaining = torch.where(resolved, torch.zeros_like(remaining), remaining)
        if not bool((remaining > 0).any()):
            break
    return selected, remaining


def _lowest_indices(
    pieces: Sequence[Piece],
    tied: list[torch.Tensor],
    owed: torch.Tensor,
    collectives: Collectives,
) -> list[torch.Tensor]:
    """Per group g, the ``owed[g]`` tied candidates with the lowest global index.

    ``tied[i]`` are ascending positions in piece i, so counts below any boundary come from
    ``searchsorted``: a radix descent over the index costs O(256 log n) per piece and pass.
    """
    num_groups = owed.numel()
    device = owed.device
    global_index = [t + p.offset for t, p in zip(tied, pieces)]
    prefix = torch.zeros(num_groups, dtype=torch.int64, device=device)
    owed = owed.clone()
    for shift in range(_INDEX_BITS - 8, -1, -8):
        edges = prefix[:, None] + (torch.arange(_BINS + 1, device=device) << shift)[None, :]
        hist = torch.zeros(num_groups, _BINS, dtype=torch.int64, device=device)
        for p, gi in zip(pieces, global_index):
            hist[p.group] += torch.searchsorted(gi, edges[p.group]).diff()
        collectives.all_reduce_sum(hist)
        cum_below = hist.cumsum(1)
        pivot = (cum_below < owed[:, None]).sum(1).clamp(max=_BINS - 1)
        owed -= torch.where(pivot > 0, cum_below.gather(1, (pivot - 1).clamp(min=0)[:, None])[:, 0], 0)
        prefix += pivot << shift
    # prefix[g] is now the global index of the last element owed (or 0 where none was owed)
    return [
        (gi[gi <= prefix[p.group]] if int(owed[p.group]) > 0 else gi[:0]) - p.offset
        for p, gi in zip(pieces, global_index)
    ]


def top_k_masks(
    pieces: Sequence[Piece],
    k: Sequence[int],
    collectives: Collectives = LOCAL,
    largest: bool = True,
) -> list[torch.Tensor]:
    """Boolean masks (one per piece, shaped like its scores) marking, per group g, the k[g]
    largest (or smallest) eligible scores across all ranks; ties go to the lowest global index.

    Collective: every rank in ``collectives`` must call with the same number of groups, the same k
    and score dtype; only int64 count tensors of shape [groups] and [groups, 256] are all-reduced.
    """
    device = pieces[0].scores.device if pieces else torch.device("cpu")
    groups = [p.group for p in pieces]
    sizes = [p.scores.numel() for p in pieces]
    candidates: list[torch.Tensor | None] = [
        None if p.eligible is None else p.eligible.reshape(-1).nonzero()[:, 0] for p in pieces
    ]
    want = torch.tensor(list(k), dtype=torch.int64, device=device)
    if (want < 0).any():
        raise ValueError(f"top-k needs k >= 0, got {list(k)}")
    available = torch.zeros_like(want)
    for i, cand in enumerate(candidates):
        available[groups[i]] += sizes[i] if cand is None else cand.numel()
    collectives.all_reduce_sum(available)
    if (want > available).any():
        bad = int(torch.nonzero(want > available)[0, 0])
        raise ValueError(
            f"top-k asked for {int(want[bad])} elements of group {bad}, which has only "
            f"{int(available[bad])} eligible"
        )
    for p in pieces:
        if p.offset + p.scores.numel() > 2**_INDEX_BITS:
            raise ValueError(f"global index {p.offset + p.scores.numel()} exceeds 2**{_INDEX_BITS}")

    bits = max((key_bits(p.scores.dtype) for p in pieces), default=32)
    flip = (1 << bits) - 1 if largest else 0  # xor with all-ones reverses the unsigned order

    def value_key(i: int, positions: torch.Tensor | None) -> torch.Tensor:
        flat = pieces[i].scores.reshape(-1)
        return ordered_keys(flat if positions is None else flat[positions], bits) ^ flip

    chosen, tied_owed = _radix_smallest(value_key, sizes, groups, candidates, want, bits, collectives)
    if bool((tied_owed > 0).any()):
        tied = [torch.arange(n, device=device) if c is None else c for c, n in zip(candidates, sizes)]
        by_index = _lowest_indices(pieces, tied, tied_owed, collectives)
        chosen = [a + [b] for a, b in zip(chosen, by_index)]
    masks = []
    for p, positions in zip(pieces, chosen):
        mask = torch.zeros(p.scores.numel(), dtype=torch.bool, device=device)
        if positions:
            mask[torch.cat(positions)] = True
        masks.append(mask.view(p.scores.shape))
    return masks
