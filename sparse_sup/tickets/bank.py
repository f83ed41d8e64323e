"""The ticket bank: a run's superposition side chain S beside the model that trains.

P and each ticket T_i are merged in (``tickets.merge``), S is re-pruned to k = floor(d_final * N)
target weights, and swapped into the model while S_i is recalibrated and evaluated (then swapped
back: training continues on T_i), and for good at the end (S_M). Works on the backend's state
tensors (local pieces, the model's placement); global counts are all-reduced over its shard group."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..core.masks import MaskState
from ..core.targets import Target
from .superpose import SuperpositionChain

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..config.schema import TicketsConfig

log = logging.getLogger(__name__)


class TicketBank:
    def __init__(self, tickets: TicketsConfig, backend: Backend) -> None:
        self.tickets, self.backend = tickets, backend
        self.chain: SuperpositionChain | None = None

    def _new_chain(self) -> SuperpositionChain:
        return SuperpositionChain(self.tickets.merge, self.tickets.ema_ticket_weight)

    def merge(self) -> None:
        """Merge the model as it is now (P, or a ticket) into S."""
        if self.chain is None:
            self.chain = self._new_chain()
        self.chain.merge(self.backend.state_tensors())

    def density(self, total_target_weights: int) -> float:
        """Density of S's target masks (global: local counts all-reduced over the shard group)."""
        kept = torch.stack([m.sum() for m in self.chain.masks.values()]).sum().to(torch.int64).reshape(1)
        self.backend.shard.all_reduce_sum(kept)
        return int(kept) / total_target_weights

    @contextlib.contextmanager
    def holding_superposed(self) -> Iterator[None]:
        """The model holds S inside the block, and its own tensors again after it."""
        tensors = self.backend.state_tensors()
        self.chain.swap(tensors)
        self.backend.refresh_model_weights()
        try:
            yield
        finally:
            self.chain.swap(tensors)
            self.backend.refresh_model_weights()

    def install(self, masks: MaskState, targets: Sequence[Target]) -> None:
        """The final model is S: its tensors and masks in place (optimizer state outside S's masks
        belongs to no weight and is zeroed)."""
        self.chain.swap(self.backend.state_tensors())
        for name, mask in self.chain.masks.items():
            masks.masks[name].copy_(mask)
        masks.recount()
        masks.apply(targets)
        self.backend.refresh_model_weights()

    def state_dict(self) -> dict | None:
        return None if self.chain is None else self.chain.state_dict()

    def load_state_dict(self, state: dict | None, device: torch.device | None) -> None:
        self.chain = None
        if state is not None:
            self.chain = self._new_chain()
            self.chain.load_state_dict(state, device=device)
