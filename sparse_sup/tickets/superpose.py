"""The superposed model S_i, kept as a side chain beside the model that trains.

S_0 = P (the model at the end of phase 1, unless left out); at each ticket T_i,
CAA: S_i = i/(i+1) * S_{i-1} + 1/(i+1) * T_i, or EMA: S_i = a * S_{i-1} + (1 - a) * T_i, over every
floating-point tensor (weights, biases, norm affine and running statistics); then an optional
global magnitude re-prune of the target weights to exactly k = floor(d_final * N).
The chain holds local pieces in the same placement as the model's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.collectives import Collectives
from ..core.targets import Target
from ..core.topology import global_magnitude_masks

MERGE_RULES = ("caa", "ema")


class SuperpositionChain:
    """Owns a copy of the model's floating tensors (``names`` order) and S's target masks."""

    def __init__(self, names: Sequence[str], rule: str = "caa", ema_decay: float = 0.5) -> None:
        if rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {rule!r}; allowed: {MERGE_RULES}")
        self.names = list(names)
        self.rule = rule
        self.ema_decay = ema_decay
        self.tensors: list[torch.Tensor] = []
        self.num_merged = 0
        self.masks: dict[str, torch.Tensor] = {}

    def merge(self, model_tensors: Sequence[torch.Tensor]) -> None:
        """Fold the model's current tensors (a ticket, or P) into S."""
        if not self.tensors:
            self.tensors = [t.detach().clone() for t in model_tensors]
        else:
            weight = 1.0 / (self.num_merged + 1) if self.rule == "caa" else 1.0 - self.ema_decay
            floats = [(s, t) for s, t in zip(self.tensors, model_tensors) if s.is_floating_point()]
            torch._foreach_lerp_([s for s, _ in floats], [t.detach() for _, t in floats], weight)
            for s, t in zip(self.tensors, model_tensors):
                if not s.is_floating_point():
                    s.copy_(t)  # counters such as BN's num_batches_tracked follow the latest model
        self.num_merged += 1

    def reprune(self, targets: Sequence[Target], keep: int, collectives: Collectives) -> None:
        """Keep exactly ``keep`` target weights of S by global magnitude (ties: lowest index)."""
        by_name = dict(zip(self.names, self.tensors))
        values = [by_name[t.name] for t in targets]
        self.masks = global_magnitude_masks(targets, values, keep, collectives)
        for t, v in zip(targets, values):
            v.mul_(self.masks[t.name])

    def swap(self, model_tensors: Sequence[torch.Tensor]) -> None:
        """Exchange contents with the model in place (data pointers stay put on both sides)."""
        for s, m in zip(self.tensors, model_tensors):
            tmp = m.detach().clone()
            m.detach().copy_(s)
            s.copy_(tmp)
