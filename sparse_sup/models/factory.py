"""Build any timm model by name (never pretrained), optionally with a CIFAR stem."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import timm
from torch import nn

from ..config.errors import ConfigError
from . import vgg_cifar  # noqa: F401  (registers 'vgg19_bn_cifar' with timm)
from .cifar_stem import apply_cifar_stem

__all__ = ["build_model"]

_LOG = logging.getLogger(__name__)

_RESERVED_KWARGS = (
    "pretrained",
    "num_classes",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
)


def _check_known(name: str) -> None:
    """Raise ``ValueError`` (with close matches) if timm does not know ``name``."""
    if isinstance(name, str) and timm.is_model(name):
        return
    close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
    raise ConfigError(f"Unknown model name {name!r} (model.name).{hint}")


def build_model(
    name: str,
    num_classes: int,
    cifar_stem: bool = False,
    drop_rate: float = 0.0,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Create ``timm.create_model(name, pretrained=False, num_classes=..., **kwargs)``.

    Args:
        name: any registered timm name (incl. ``vgg19_bn_cifar``), optionally with a ``.tag``.
        num_classes: classifier outputs (0 = timm's pooled-features / no head).
        cifar_stem: swap a timm ResNet stem for 3x3/s1 conv and drop the max-pool.
        drop_rate: classifier dropout, forwarded as timm's ``drop_rate`` when non-zero.
        kwargs: extra model kwargs, e.g. ``{"img_size": 32, "patch_size": 4}`` for ViTs.

    Raises:
        ValueError: unknown name (checked first), conflicting/reserved kwargs, or
            ``cifar_stem`` on a non-ResNet.
    """
    _check_known(name)
    if not isinstance(cifar_stem, bool):
        raise TypeError(f"cifar_stem must be a bool, got {cifar_stem!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    extra = dict(kwargs or {})
    bad = [k for k in _RESERVED_KWARGS if k in extra]
    if bad:
        raise ConfigError(
            f"model.kwargs may not set {bad}: build_model never loads pretrained weights "
            f"and takes num_classes as an argument"
        )
    if drop_rate:
        if "drop_rate" in extra and extra["drop_rate"] != drop_rate:
            raise ConfigError(
                f"model.drop_rate={drop_rate} conflicts with model.kwargs['drop_rate']={extra['drop_rate']}"
            )
        extra["drop_rate"] = drop_rate

    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **extra)
    except TypeError as e:  # a keyword the model's constructor does not take
        if not extra or "argument" not in str(e):
            raise
        raise ConfigError(
            f"model.kwargs={extra} is not accepted by timm model {name!r}: {e}; "
            "remove or rename the key (see the model's constructor in timm)"
        ) from None
    if cifar_stem:
        apply_cifar_stem(model, name)
    n_params = sum(p.numel() for p in model.parameters())
    _LOG.info(
        "built %s (num_classes=%d, cifar_stem=%s, kwargs=%s): %.2fM params",
        name,
        num_classes,
        cifar_stem,
        extra,
        n_params / 1e6,
    )
    return model
