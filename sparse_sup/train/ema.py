"""EMA of the training weights (``train.ema``) through timm's ``ModelEmaV3``, kept exactly inside
the masks, evaluated beside the live model.

How EMA and tickets interact (the choice made here):

* the EMA follows the *training trajectory* -- the live weights, which are the tickets' own weights
  (phase 1, then each cycle; the superposition S_i is swapped in only to evaluate and save it);
* after every applied optimizer step it is updated (parameters and BatchNorm buffers, one
  ``_foreach_lerp_``) and then multiplied by the live masks, so every masked entry of the EMA is
  exactly zero and its support is always the live model's (after a topology update or a cycle's
  re-exploration, weights that left the mask leave the EMA at once; regrown ones enter from 0);
* it is evaluated at P and at each ticket T_i (label ``P_ema``, ``T_1_ema``, ...) and at the end
  (``final_ema``), beside the live model; it never enters a ticket, the superposition chain or S.
  With ``tickets.mask_in_cycles=frozen`` the EMA during a cycle averages within that cycle's
  support; its horizon is about ``1 / (1 - train.ema_decay)`` optimizer steps, so choose the decay
  shorter than a cycle for a per-ticket EMA, longer to average over tickets;
* it is part of run checkpoints, so ``--resume`` continues it exactly.

Whole-tensor engines only (one process, DDP): under FSDP2 and DeepSpeed the weights are sharded and
``ModelEmaV3``'s deep copy would gather nothing; those are refused.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..core.names import normalize_name


class MaskedEma:
    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(module, decay=decay, foreach=True)
        self.params = {normalize_name(n): p for n, p in self.ema.module.named_parameters()}

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    @torch.no_grad()
    def update(self, module: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
        """One EMA step toward ``module`` (the live, unwrapped model), then zero what the masks drop."""
        self.ema.update(module)
        self.apply_masks(masks)

    @torch.no_grad()
    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            self.params[normalize_name(name)].mul_(mask)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(state)


def build_ema(train_config, backend, masks: dict[str, torch.Tensor]) -> MaskedEma | None:
    """``MaskedEma`` of the backend's module, inside ``masks``, when ``train.ema`` is set
    (whole-tensor engines only)."""
    if not train_config.ema:
        return None
    if backend.kind not in ("single", "ddp"):
        raise ConfigError(
            f"train.ema=true is supported on one process and DDP, not under {backend.kind}: the weights "
            "are sharded there and timm's ModelEmaV3 keeps a whole copy of the model"
        )
    ema = MaskedEma(backend.module, train_config.ema_decay)
    ema.apply_masks(masks)
    return ema
