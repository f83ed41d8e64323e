"""The superposed model S_i, kept as a side chain beside the model that trains.

S_0 = P (the model at the end of phase 1, unless left out); at each ticket T_i,
CAA: S_i = i/(i+1) * S_{i-1} + 1/(i+1) * T_i, or EMA: S_i = a * S_{i-1} + (1 - a) * T_i, over every
floating-point tensor (weights, biases, norm affine and running statistics); then an optional
global magnitude re-prune of the target weights to exactly k = floor(d_final * N).
The chain holds local pieces in the same placement as the model's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..core.collectives import Collectives
from ..core.masks import zero_outside
from ..core.targets import Target
from ..core.topology import global_magnitude_masks

MERGE_RULES = ("caa", "ema")


class SuperpositionChain:
    """Owns a copy of the model's tensors, keyed by name, and S's target masks."""

    def __init__(self, rule: str = "caa", ema_decay: float = 0.5) -> None:
        if rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {rule!r}; allowed: {MERGE_RULES}")
        self.rule = rule
        self.ema_decay = ema_decay
        self.tensors: dict[str, torch.Tensor] = {}
        self.num_merged = 0
        self.masks: dict[str, torch.Tensor] = {}

    def _check_names(self, model_tensors: Mapping[str, torch.Tensor]) -> None:
        if set(model_tensors) != set(self.tensors):
            differ = sorted(set(model_tensors) ^ set(self.tensors))
            raise KeyError(f"superposition chain and model hold different tensors: {differ[:5]}")

    def merge(self, model_tensors: Mapping[str, torch.Tensor]) -> None:
        """Fold the model's current tensors (a ticket, or P), by name, into S."""
        if not self.tensors:
            self.tensors = {n: t.detach().clone() for n, t in model_tensors.items()}
        else:
            self._check_names(model_tensors)
            weight = 1.0 / (self.num_merged + 1) if self.rule == "caa" else 1.0 - self.ema_decay
            floats = [n for n, s in self.tensors.items() if s.is_floating_point()]
            torch._foreach_lerp_(
                [self.tensors[n] for n in floats], [model_tensors[n].detach() for n in floats], weight
            )
            for n, s in self.tensors.items():
                if not s.is_floating_point():
                    s.copy_(model_tensors[n])  # counters such as BN's num_batches_tracked follow the latest
        self.num_merged += 1

    def reprune(self, targets: Sequence[Target], keep: int, collectives: Collectives) -> None:
        """Keep exactly ``keep`` target weights of S by global magnitude (ties: lowest index)."""
        values = [self.tensors[t.name] for t in targets]
        self.masks = global_magnitude_masks(targets, values, keep, collectives)
        zero_outside(values, [self.masks[t.name] for t in targets])

    def swap(self, model_tensors: Mapping[str, torch.Tensor]) -> None:
        """Exchange contents with the model in place (data pointers stay put on both sides)."""
        self._check_names(model_tensors)
        for n, s in self.tensors.items():
            m = model_tensors[n].detach()
            tmp = m.clone()
            m.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict:
        """Tensors and masks by name, in their local placement (a checkpoint saves one per rank)."""
        return {
            "rule": self.rule,
            "ema_decay": self.ema_decay,
            "num_merged": self.num_merged,
            "tensors": {n: t.clone() for n, t in self.tensors.items()},
            "masks": {n: m.clone() for n, m in self.masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["rule"], state["ema_decay"]) != (self.rule, self.ema_decay):
            raise ValueError(
                f"saved superposition chain uses {state['rule']} (decay {state['ema_decay']}), this run "
                f"{self.rule} (decay {self.ema_decay}); resume with the run's own tickets settings"
            )
        self.num_merged = state["num_merged"]
        self.tensors = {n: t.clone() for n, t in state["tensors"].items()}
        self.masks = {n: m.clone() for n, m in state["masks"].items()}
