"""Exact top-k over tensors that may be split across ranks, without gathering them.

A selection problem is a list of *pieces*: local, contiguous runs of elements, each belonging to a
*group* (a layer for per-layer selection, one group for a global selection) and starting at a known
global flat index inside that group. For each group we select the k largest (or smallest) scores;
ties go to the lowest global flat index. The answer equals a stable sort of the group's
concatenation in global-index order, whatever the sharding.

How: scores are mapped to order-preserving unsigned integer keys and the k-th key is found by a
radix descent, 8 bits at a time. Each pass all-reduces one [groups, 256] count histogram, so ranks
exchange O(groups * 256) integers, never tensor data. Exact ties at the threshold are broken by a
second radix descent over the global index. Host reads: one to validate the request, one per
radix pass (whether to go on, and how many candidates each piece keeps: candidates are masks within
a pass and are compacted after it with ``nonzero_static``, which needs no read of its own; a
compaction per piece by boolean indexing read a size each), one for the tie-break.
Extra memory is O(local piece): candidates shrink to ~1/256 after the first pass on continuous
data.
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


def ordered_keys(scores: torch.Tensor, bits: int, check_nan: bool = True) -> torch.Tensor:
    """int64 keys whose unsigned order over ``bits`` bits equals the float order of ``scores``.

    -0.0 and +0.0 get the same key. Raises on NaN (diverged weights or gradients) unless
    ``check_nan=False`` (a host read; ``top_k_masks`` checks all pieces at once instead).
    """
    if bits == 64:
        x = scores.detach().reshape(-1).to(torch.float64) + 0.0  # + 0.0 turns -0.0 into +0.0
        raw, low, sign = x.view(torch.int64), 2**63 - 1, -(2**63)
    else:
        x = scores.detach().reshape(-1).to(torch.float32) + 0.0
        raw, low, sign = x.view(torch.int32).to(torch.int64), 2**31 - 1, 2**31
    if check_nan and torch.isnan(x).any():
        raise ValueError("NaN in selection scores: the weights or gradients have diverged")
    signed_order = torch.where(raw < 0, raw ^ low, raw)
    return signed_order ^ sign  # flip the sign bit: signed order -> unsigned order


def _search_keys(scores: torch.Tensor, bits: int, largest: bool) -> torch.Tensor:
    """Keys whose unsigned order over ``bits`` bits is the selection order (ascending for the
    smallest, reversed for the largest): ``ordered_keys`` (xor all-ones for ``largest``), kept in
    int32 for 32-bit keys (the bit pattern of the unsigned key; digits are read with shifts and a
    uint8 cast), which halves the memory traffic of the first, full pass."""
    if bits == 64:
        return ordered_keys(scores, 64, check_nan=False) ^ (-1 if largest else 0)
    raw = (scores.detach().reshape(-1).to(torch.float32) + 0.0).view(torch.int32)  # -0.0 -> +0.0
    signed_order = torch.where(raw < 0, raw ^ (2**31 - 1), raw)
    # unsigned key = signed_order ^ 0x80000000; reversed: ^ 0xFFFFFFFF more, i.e. ^ 0x7FFFFFFF
    return signed_order ^ (2**31 - 1 if largest else -(2**31))


def _digits(keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Bits [shift, shift + 8) of each key as uint8 (the cast keeps the low 8 bits)."""
    return (keys >> shift if shift else keys).to(torch.uint8)


def _histogram(
    num_groups: int, groups: Sequence[int], digits: list[torch.Tensor], alive: list[torch.Tensor], device
) -> torch.Tensor:
    """[groups, 256] counts of the alive elements' digits (no host read: scatter_add, not bincount)."""
    hist = torch.zeros(num_groups, _BINS, dtype=torch.int64, device=device)
    for g, d, a in zip(groups, digits, alive):
        hist[g].scatter_add_(0, d.to(torch.int64), a.to(torch.int64))
    return hist


def _pivot(hist: torch.Tensor, remaining: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the smallest digit whose cumulative count reaches what is still owed, and how many
    elements lie below it."""
    cum_below = hist.cumsum(1)  # count with digit <= d
    pivot = (cum_below < remaining[:, None]).sum(1).clamp(max=_BINS - 1)
    below = torch.where(pivot > 0, cum_below.gather(1, (pivot - 1).clamp(min=0)[:, None])[:, 0], 0)
    return pivot, below


def _compact(alive: list[torch.Tensor], positions: list[torch.Tensor | None], counts: list[int]) -> None:
    """Replace each piece's candidates by the alive ones (ascending positions), in place. Sizes are
    known (``counts``, read with the pass's one read): ``nonzero_static`` reads nothing more."""
    for i, n in enumerate(counts):
        keep = torch.nonzero_static(alive[i], size=n)[:, 0]
        positions[i] = keep if positions[i] is None else positions[i][keep]
        alive[i] = torch.ones(n, dtype=torch.bool, device=keep.device)


def _mark(selected: torch.Tensor, positions: torch.Tensor | None, chosen: torch.Tensor) -> None:
    """selected[positions] |= chosen (positions: None for every position; unique otherwise)."""
    if positions is None:
        selected |= chosen
    else:
        selected.index_put_((positions,), chosen | selected[positions])


def _radix_smallest(
    key_at: Callable[[int, torch.Tensor | None], torch.Tensor],
    sizes: Sequence[int],
    groups: Sequence[int],
    alive: list[torch.Tensor],
    remaining: torch.Tensor,
    bits: int,
    collectives: Collectives,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor | None]]:
    """Per group g, select the ``remaining[g]`` candidates with the smallest key.

    ``alive[i]`` (bool, flat) marks the candidates of piece i; ``key_at(i, positions)`` gives piece
    i's keys there (None: all). Returns the selection per piece (bool, flat, piece-sized), per group
    how many are still owed because of exact key ties, and the tied candidates' positions.
    Within a pass, candidates are masks (no host read); after it one read says whether any group
    still owes and how many candidates each piece keeps, and they are compacted with
    ``nonzero_static`` (~1/256 left after the first pass on continuous data).
    """
    num_groups = remaining.numel()
    device = remaining.device
    selected = [torch.zeros(n, dtype=torch.bool, device=device) for n in sizes]
    positions: list[torch.Tensor | None] = [None] * len(sizes)
    for shift in range(bits - 8, -1, -8):
        digits = [_digits(key_at(i, positions[i]), shift) for i in range(len(sizes))]
        hist = _histogram(num_groups, groups, digits, alive, device)
        collectives.all_reduce_sum(hist)
        pivot, below = _pivot(hist, remaining)
        remaining = remaining - below
        at_pivot = hist.gather(1, pivot[:, None])[:, 0]
        resolved = (at_pivot == remaining) | (remaining == 0)
        take_tied = resolved & (remaining > 0)  # every candidate at the pivot is selected
        for i, (g, d) in enumerate(zip(groups, digits)):
            at = alive[i] & (d == pivot[g])
            _mark(selected[i], positions[i], (alive[i] & (d < pivot[g])) | (at & take_tied[g]))
            alive[i] = at & ~resolved[g]
        remaining = torch.where(resolved, torch.zeros_like(remaining), remaining)
        owing, *counts = torch.stack([(remaining > 0).any().long(), *[a.sum() for a in alive]]).tolist()
        _compact(alive, positions, counts)  # the pass's one host read, just above
        if not owing:
            break
    return selected, remaining, positions


def _lowest_indices(
    pieces: Sequence[Piece],
    tied: list[torch.Tensor],
    owed: torch.Tensor,
    collectives: Collectives,
) -> list[torch.Tensor]:
    """Per group g, the ``owed[g]`` tied candidates with the lowest global index, as piece-sized
    bool masks; no host read. ``tied[i]`` are ascending positions in piece i, so counts below any
    boundary come from ``searchsorted``: a radix descent over the index costs O(256 log n) per
    piece and pass."""
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
        pivot, below = _pivot(hist, owed)
        owed -= below
        prefix += pivot << shift
    # prefix[g] is now the global index of the last element owed (or 0 where none was owed)
    masks = []
    for p, t, gi in zip(pieces, tied, global_index):
        mask = torch.zeros(p.scores.numel(), dtype=torch.bool, device=device)
        mask.index_put_((t,), (gi <= prefix[p.group]) & (owed[p.group] > 0))
        masks.append(mask)
    return masks


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
    if any(n < 0 for n in k):
        raise ValueError(f"top-k needs k >= 0, got {list(k)}")
    for p in pieces:
        if p.offset + p.scores.numel() > 2**_INDEX_BITS:
            raise ValueError(f"global index {p.offset + p.scores.numel()} exceeds 2**{_INDEX_BITS}")
    alive = [
        torch.ones(p.scores.numel(), dtype=torch.bool, device=device)
        if p.eligible is None
        else p.eligible.reshape(-1).to(device=device, dtype=torch.bool).clone()
        for p in pieces
    ]
    want = torch.tensor(list(k), dtype=torch.int64, device=device)
    available = torch.zeros_like(want)
    nan = torch.zeros((), dtype=torch.bool, device=device)
    for g, a, p in zip(groups, alive, pieces):
        available[g] += a.sum()
        nan |= torch.isnan(p.scores.detach()).any() if p.scores.is_floating_point() else False
    collectives.all_reduce_sum(available)
    short, has_nan = torch.stack([(want > available).any(), nan]).tolist()  # one host read
    if has_nan:
        raise ValueError("NaN in selection scores: the weights or gradients have diverged")
    if short:
        bad = int(torch.nonzero(want > available)[0, 0])
        raise ValueError(
            f"top-k asked for {int(want[bad])} elements of group {bad}, which has only "
            f"{int(available[bad])} eligible"
        )

    bits = max((key_bits(p.scores.dtype) for p in pieces), default=32)

    def value_key(i: int, positions: torch.Tensor | None) -> torch.Tensor:
        flat = pieces[i].scores.reshape(-1)
        return _search_keys(flat if positions is None else flat[positions], bits, largest)

    sizes = [p.scores.numel() for p in pieces]
    chosen, tied_owed, positions = _radix_smallest(value_key, sizes, groups, alive, want, bits, collectives)
    if bool((tied_owed > 0).any()):  # the tied candidates: compacted after the last pass
        tied = [torch.arange(n, device=device) if t is None else t for t, n in zip(positions, sizes)]
        by_index = _lowest_indices(pieces, tied, tied_owed, collectives)
        chosen = [a | b for a, b in zip(chosen, by_index)]
    return [mask.view(p.scores.shape) for p, mask in zip(pieces, chosen)]
