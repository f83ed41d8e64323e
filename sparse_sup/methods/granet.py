"""GraNet (Liu et al., 2021): RigL that starts denser (``sparse.granet_initial_density``) and,
before each topology update between prune start and end, prunes globally by magnitude along a
cubic schedule; phase 1 always ends with a global prune to ``sparse.density``, so tickets and S are
at the target density whatever the schedule."""

from __future__ import annotations

from ..config.errors import ConfigError
from ..core.schedules import granet_density
from .base import DSTMethod, register_method


@register_method
class GraNet(DSTMethod):
    name = "granet"
    grow = "gradient"

    @classmethod
    def check_config(cls, sparse) -> None:
        if not sparse.density <= sparse.granet_initial_density <= 1:
            raise ConfigError(
                f"sparse.granet_initial_density={sparse.granet_initial_density!r} is invalid: "
                f"in [sparse.density={sparse.density}, 1]"
            )
        if not 0 <= sparse.granet_prune_start_epoch <= sparse.granet_prune_end_epoch:
            raise ConfigError(
                f"sparse.granet_prune_end_epoch={sparse.granet_prune_end_epoch!r} is invalid: "
                f">= sparse.granet_prune_start_epoch={sparse.granet_prune_start_epoch} >= 0"
            )

    @property
    def initial_density(self) -> float:
        return self.sparse.granet_initial_density

    def prune_density(self, completed: int) -> float | None:
        plan, sparse = self.plan, self.sparse
        if completed == plan.pre_steps:
            return sparse.density
        due = plan.prune_start <= completed < plan.pre_steps and completed % sparse.update_interval == 0
        if not due:
            return None
        return granet_density(
            completed,
            initial=sparse.granet_initial_density,
            final=sparse.density,
            start=plan.prune_start,
            end=plan.prune_end,
        )
