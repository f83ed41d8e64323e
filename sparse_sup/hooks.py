"""What the engine tells its front end (the CLI loop, the Trainer, tests): phase events and the
data-dependent work it delegates (evaluation, BN recalibration passes, saving)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import SupTicketsEngine


class EngineHooks:
    """Called by the engine at phase events; the training loop overrides what it needs."""

    def on_phase1_end(self, engine: SupTicketsEngine) -> None:
        """The model holds P, the end of phase 1."""

    def on_ticket(self, engine: SupTicketsEngine, index: int) -> None:
        """The model holds ticket T_index (0-based), at the cycle's LR minimum."""

    def recalibrate_bn(self, engine: SupTicketsEngine) -> None:
        """Recompute BN statistics of the model as it is now (it holds S_i)."""

    def on_superposed(self, engine: SupTicketsEngine, index: int) -> None:
        """The model holds S_{index+1} (re-pruned and recalibrated); it is swapped back after."""

    def on_topology_update(self, engine: SupTicketsEngine, kind: str, swapped: dict[str, int]) -> None:
        """A mask change happened (kind: update, reexplore, prune)."""
