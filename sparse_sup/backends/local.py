"""One process, or DDP: every rank holds whole tensors, so selection needs no collective
(``shard`` is local) and only BN statistics and evaluation reduce over the data-parallel group.
Masks are identical across DDP ranks by construction: gradients are already all-reduced and
random choices come from counter-based keys."""

from __future__ import annotations

import torch

from ..core.collectives import LOCAL, Collectives
from ..core.names import normalize_name
from ..core.targets import Target, whole_tensor_target


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The torch optimizer under Accelerate's wrapper (which proxies ``.optimizer``)."""
    while (
        optimizer is not None
        and hasattr(optimizer, "optimizer")
        and not isinstance(optimizer, torch.optim.Optimizer)
    ):
        optimizer = optimizer.optimizer
    return optimizer


class LocalBackend:
    """Whole-tensor targets on ``model`` (possibly DDP- or compile-wrapped: names are normalised)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        target_names: list[str],
        data_parallel: Collectives = LOCAL,
    ) -> None:
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer)
        self.target_names = [normalize_name(n) for n in target_names]
        self.shard: Collectives = LOCAL
        self.data_parallel = data_parallel

    def targets(self) -> list[Target]:
        params = {normalize_name(n): p for n, p in self.model.named_parameters()}
        missing = [n for n in self.target_names if n not in params]
        if missing:
            raise KeyError(f"target parameters not found in the model: {missing[:5]}")
        return [whole_tensor_target(n, params[n], self.optimizer) for n in self.target_names]

    def refresh_model_weights(self) -> None:
        """Targets alias the model's own weights: nothing to propagate."""

    def state_tensors(self) -> tuple[list[str], list[torch.Tensor]]:
        """Every parameter and buffer (detached views), in state_dict order."""
        items = [(normalize_name(n), t.detach()) for n, t in self.model.state_dict(keep_vars=True).items()]
        return [n for n, _ in items], [t for _, t in items]

    def full_state(self) -> dict[str, torch.Tensor]:
        return {normalize_name(k): v for k, v in self.model.state_dict().items()}

    def full_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return masks
