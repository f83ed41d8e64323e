"""Topology updates on local pieces: drop by magnitude, regrow by a criterion, global prune.

Every decision goes through ``top_k_masks``, so it is exact and identical on every rank whatever
the sharding. Masks, weights and optimizer state are mutated in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .collectives import Collectives
from .masks import MaskState, random_pieces, zero_outside
from .select import Piece, top_k_masks
from .targets import Target

# grow criterion: (targets, eligible masks, step, seed, grad scores) -> pieces to take the top-k of
GrowCriterion = Callable[
    [Sequence[Target], dict[str, torch.Tensor], int, int, dict[str, torch.Tensor] | None], list[Piece]
]


def _grow_random(targets, eligible, step, seed, scores):  # SET: uniform at random
    return random_pieces(targets, seed, step, eligible)


def _grow_gradient(targets, eligible, step, seed, scores):  # RigL: largest |dense gradient|
    if scores is None:
        raise RuntimeError("gradient regrowth needs the dense gradient scores of this step")
    return [Piece(scores[t.name], i, t.offset, eligible[t.name]) for i, t in enumerate(targets)]


GROW_CRITERIA: dict[str, GrowCriterion] = {"random": _grow_random, "gradient": _grow_gradient}


def _commit(
    targets: Sequence[Target],
    state: MaskState,
    new_masks: dict[str, torch.Tensor],
    reset: dict[str, torch.Tensor] | None = None,
) -> None:
    """Install ``new_masks`` in place; zero weights and optimizer state outside them and at the
    ``reset`` positions (newly grown weights start at 0 with zero optimizer state)."""
    for t in targets:
        keep = new_masks[t.name] if reset is None else new_masks[t.name] & ~reset[t.name]
        states = t.optimizer_states()
        zero_outside([t.param, *states], [keep] * (1 + len(states)))
        state.masks[t.name].copy_(new_masks[t.name])
    state.recount()


def drop_and_grow(
    targets: Sequence[Target],
    state: MaskState,
    fraction: float,
    grow: str,
    step: int,
    seed: int,
    collectives: Collectives,
    grad_scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Per layer, drop round(fraction * active) smallest-|w| active weights and regrow as many
    inactive ones (just-dropped included) by ``grow``. Density is preserved exactly. Weights that
    were inactive before start at 0 with zero optimizer state; a just-dropped weight that is
    regrown keeps its value (as in RigL's reference code), so a dense layer is left unchanged.
    Returns the number swapped per layer."""
    num_swap = [round(fraction * state.counts[t.name]) for t in targets]
    weights = [Piece(t.param.abs(), i, t.offset, state.masks[t.name]) for i, t in enumerate(targets)]
    dropped = top_k_masks(weights, num_swap, collectives, largest=False)
    del weights
    kept = {t.name: state.masks[t.name] & ~d.view_as(t.param) for t, d in zip(targets, dropped)}
    eligible = {name: ~m for name, m in kept.items()}
    pieces = GROW_CRITERIA[grow](targets, eligible, step, seed, grad_scores)
    grown = {t.name: g.view_as(t.param) for t, g in zip(targets, top_k_masks(pieces, num_swap, collectives))}
    new_masks = {name: kept[name] | grown[name] for name in kept}
    newly_active = {name: grown[name] & ~state.masks[name] for name in kept}
    _commit(targets, state, new_masks, reset=newly_active)
    return {t.name: n for t, n in zip(targets, num_swap)}


def global_offsets(targets: Sequence[Target]) -> list[int]:
    """Global flat index of each target's first local element when all targets are viewed as
    one vector in target order (identical on every rank)."""
    offsets, base = [], 0
    for t in targets:
        offsets.append(base + t.offset)
        base += t.numel
    return offsets


def global_magnitude_masks(
    targets: Sequence[Target],
    values: Sequence[torch.Tensor],
    keep: int,
    collectives: Collectives,
    eligible: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks keeping the ``keep`` largest |values| over all targets together (one threshold),
    ties to the lowest global index."""
    pieces = [
        Piece(v.abs(), 0, off, None if eligible is None else eligible[t.name])
        for t, v, off in zip(targets, values, global_offsets(targets))
    ]
    chosen = top_k_masks(pieces, [keep], collectives)
    return {t.name: m.view_as(t.param) for t, m in zip(targets, chosen)}


def global_prune(targets: Sequence[Target], state: MaskState, keep: int, collectives: Collectives) -> None:
    """GraNet's gradual magnitude prune: keep the ``keep`` largest active weights globally."""
    if keep >= state.total_active():
        return
    new_masks = global_magnitude_masks(targets, [t.param for t in targets], keep, collectives, state.masks)
    _commit(targets, state, new_masks)
