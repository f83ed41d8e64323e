"""The superposed model S_i, kept as a side chain beside the model that trains.

S_0 = P (the model at the end of phase 1, unless left out); at each ticket T_i,
CAA: S_i = i/(i+1) * S_{i-1} + 1/(i+1) * T_i, or EMA: S_i = (1 - w) * S_{i-1} + w * T_i (``w``, the
weight of the new ticket, as in the reference code: ``tickets.ema_ticket_weight``), over every
floating-point tensor (weights, biases, norm affine and running statistics); then an optional
global magnitude re-prune of the target weights to exactly k = floor(d_final * N).
The chain holds local pieces in the same placement as the model's tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from ..core.collectives import Collectives
from ..core.masks import zero_outside
from ..core.targets import Target
from ..core.topology import global_magnitude_masks

log = logging.getLogger(__name__)

MERGE_RULES = ("caa", "ema")


class SuperpositionChain:
    """Owns a copy of the model's tensors, keyed by name, and S's target masks."""

    def __init__(self, rule: str = "caa", ema_ticket_weight: float = 0.5) -> None:
        if rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {rule!r}; allowed: {MERGE_RULES}")
        self.rule = rule
        self.ema_ticket_weight = ema_ticket_weight
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
            weight = 1.0 / (self.num_merged + 1) if self.rule == "caa" else self.ema_ticket_weight
            floats = [n for n, s in self.tensors.items() if s.is_floating_point()]
            torch._foreach_lerp_(
                [self.tensors[n] for n in floats], [model_tensors[n].detach() for n in floats], weight
            )
            for n, s in self.tensors.items():
                if not s.is_floating_point():
                    s.copy_(model_tensors[n])  # counters such as BN's num_batches_tracked follow the latest
        self.num_merged += 1

    def reprune(self, targets: Sequence[Target], keep: int, collectives: Collectives) -> None:
        """Keep exactly ``keep`` target weights of S by global magnitude (ties: lowest index).

        If S has fewer than ``keep`` nonzero target weights (frozen masks in the cycles and no
        re-exploration: the tickets share P's support), S's mask is its nonzero support, below the
        budget: marking zero-valued positions active would fill the budget with arbitrary
        lowest-index weights that carry nothing. Collective over ``collectives`` (counts only)."""
        values = [self.tensors[t.name] for t in targets]
        nonzero = torch.stack([torch.count_nonzero(v) for v in values]).sum().reshape(1).cpu()
        collectives.all_reduce_sum(nonzero)
        if int(nonzero) < keep:
            log.warning(
                "superposition has %d nonzero target weights, fewer than the budget %d: S keeps its "
                "support (density below the target)",
                int(nonzero),
                keep,
            )
            self.masks = {t.name: v != 0 for t, v in zip(targets, values)}
            return
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
            "ema_ticket_weight": self.ema_ticket_weight,
            "num_merged": self.num_merged,
            "tensors": {n: t.clone() for n, t in self.tensors.items()},
            "masks": {n: m.clone() for n, m in self.masks.items()},
        }

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        """``device``: where the model's tensors are (a checkpoint is loaded on the CPU)."""
        saved = (state["rule"], state.get("ema_ticket_weight"))
        if saved != (self.rule, self.ema_ticket_weight):
            raise ValueError(
                f"saved superposition chain uses {saved[0]} (EMA ticket weight {saved[1]}), this run "
                f"{self.rule} (EMA ticket weight {self.ema_ticket_weight}); resume with the run's own "
                "tickets settings"
            )
        self.num_merged = state["num_merged"]
        self.tensors = {n: t.to(device, copy=True) for n, t in state["tensors"].items()}
        self.masks = {n: m.to(device, copy=True) for n, m in state["masks"].items()}
