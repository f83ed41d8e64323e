"""Optimizer construction through ``timm.optim.create_optimizer_v2``: any optimizer timm registers
(``sgd``, ``adamw``, ``lamb``, ``lars``, ``adan``, ``lion``, ...), layer-wise LR decay, fused or
foreach kernels where torch has them.

Layer-wise decay: timm puts a ``lr_scale`` in each group and leaves ``lr`` at the base value (its
schedulers multiply). Here the scale is baked into each group's ``lr`` and the groups are ordered
with a scale-1 group first, because the step writes the engine's LR into group 0 and keeps every
other group at its ratio to group 0 (``backends.base.lr_ratios``), in phase 1 and in the cycles.
"""

from __future__ import annotations

import inspect

import torch

from ..config import ConfigError, OptimConfig

# torch optimizers with a fused kernel (timm names -> torch classes)
_FUSED = ("sgd", "momentum", "nesterov", "adam", "adamw")


def _timm_name(cfg: OptimConfig) -> str:
    """The timm registry name. The project's ``sgd`` follows ``optim.nesterov`` (timm's own ``sgd``
    means Nesterov SGD; its plain-momentum SGD is ``momentum``)."""
    name = cfg.name.lower()
    if name == "sgd":
        return "nesterov" if cfg.nesterov else "momentum"
    return name


def check_optimizer_name(cfg: OptimConfig) -> None:
    """Fail with the list of names when timm does not know ``optim.name`` (before anything is written)."""
    from timm.optim import list_optimizers

    name = _timm_name(cfg)
    if name.startswith("lookahead_"):
        raise ConfigError(
            f"optim.name={cfg.name!r}: Lookahead keeps slow weights outside the optimizer's per-parameter "
            "state the masks are enforced on; not supported"
        )
    known = set(list_optimizers())
    if name not in known:
        raise ConfigError(
            f"optim.name={cfg.name!r} is not a timm optimizer; known: {', '.join(sorted(known))}"
        )


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2, get_optimizer_class

    check_optimizer_name(cfg)
    name = _timm_name(cfg)
    opt_class = get_optimizer_class(name, bind_defaults=False)
    accepted = inspect.signature(opt_class.__init__).parameters
    kwargs = {}
    if "betas" in accepted:
        kwargs["betas"] = tuple(cfg.betas)
    fused = cfg.fused if cfg.fused is not None else (name in _FUSED and torch.cuda.is_available())
    if fused:
        if "fused" not in accepted:
            raise ConfigError(f"optim.fused=true: {opt_class.__name__} ({cfg.name}) has no fused kernel")
        kwargs["fused"] = True
    optimizer = create_optimizer_v2(
        model,
        opt=name,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        foreach=False if fused else None,  # None: timm/torch pick foreach where supported
        filter_bias_and_bn=not cfg.decay_norms_and_biases,
        layer_decay=cfg.layer_decay,
        **kwargs,
    )
    groups = [g for g in optimizer.param_groups if g["params"]]
    for group in groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    # a group at the base LR first (stable: otherwise timm's order); ratios are taken to group 0
    optimizer.param_groups[:] = sorted(groups, key=lambda g: -g.get("lr_scale", 1.0))
    return optimizer
