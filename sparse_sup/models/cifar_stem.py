"""CIFAR stem surgery for timm ResNets (3x3 stride-1 stem conv, no max-pool)."""

from __future__ import annotations

import logging

from timm.models.resnet import ResNet
from torch import nn

from ..config.errors import ConfigError

__all__ = ["apply_cifar_stem"]

_LOG = logging.getLogger(__name__)


def apply_cifar_stem(model: nn.Module, name: str = "") -> nn.Module:
    """Replace a timm ResNet stem in place with the CIFAR one and return the model.

    ``conv1`` (7x7/s2, or a deep ``Sequential`` stem for ``*d``/``*t`` variants)
    becomes one fresh ``Conv2d(in_chans, C, 3, stride=1, padding=1, bias=False)``
    with the same output channels ``C``; ``maxpool`` becomes ``Identity``.
    Raises ``ValueError`` for anything that is not a ``timm.models.resnet.ResNet``.
    """
    if not isinstance(model, ResNet):
        raise ConfigError(
            f"model.cifar_stem=true is only supported for timm ResNet-family models "
            f"(timm.models.resnet.ResNet: resnet18/34/50, resnet10t, resnet50d, ...); "
            f"model {name!r} builds {type(model).__name__}. Adapt other models via kwargs "
            f"(e.g. img_size=32, patch_size=4 for ViTs) or use 'vgg19_bn_cifar'."
        )
    convs = [m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"model {name!r}: could not find a Conv2d in the ResNet stem 'conv1'")
    first, last = convs[0], convs[-1]
    out_chs = last.out_channels
    bn_chs = getattr(model.bn1, "num_features", out_chs)
    if bn_chs != out_chs:
        raise ValueError(f"model {name!r}: stem conv outputs {out_chs} channels but bn1 expects {bn_chs}")
    conv = nn.Conv2d(
        first.in_channels,
        out_chs,
        kernel_size=3,
        stride=1,
        padding=1,
        bias=False,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # timm ResNet init
    model.conv1 = conv
    model.maxpool = nn.Identity()
    # The stem no longer downsamples (was /2 conv, /2 pool): keep feature_info truthful.
    for info in getattr(model, "feature_info", []):
        if isinstance(info, dict) and "reduction" in info:
            info["reduction"] = max(1, info["reduction"] // (2 if info.get("module") == "act1" else 4))
    _LOG.debug("applied CIFAR stem to %s (%d -> %d channels)", name, first.in_channels, out_chs)
    return model
