"""CIFAR VGG-19 with BatchNorm, registered with timm as ``vgg19_bn_cifar``.

Architecture and parameter names match the GraSP/GraNet/Sup-tickets CIFAR
``VGG(depth=19, batchnorm=True)`` (``feature.N.*`` / ``classifier.*``), so
reference checkpoints load with ``load_state_dict``. The reference's
``AvgPool2d(2)`` on the 2x2 final map is written as a global average pool,
which is identical at 32x32 and also accepts other input sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["VGGCifar", "VGG19_CFG"]

VGG19_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
)


class VGGCifar(nn.Module):
    """Plain VGG for 32x32 inputs: [conv3x3(no bias)-BN-ReLU | maxpool]* -> GAP -> Linear."""

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG19_CFG,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"VGGCifar only supports global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        layers: list[nn.Module] = []
        chans = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(chans, int(v), kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                chans = int(v)
        self.feature = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = chans
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier: nn.Module = self._make_classifier(num_classes)
        self._init_weights()

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        fc = nn.Linear(self.num_features, num_classes)
        nn.init.normal_(fc.weight, 0.0, 0.01)
        nn.init.zeros_(fc.bias)
        return fc

    def _init_weights(self) -> None:
        """Reference init: Kaiming-normal (fan_in) convs, BN weight 1 / bias 0."""
        for m in self.feature.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """Return the classification layer (timm convention)."""
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier; ``num_classes=0`` yields pooled features (timm convention)."""
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"VGGCifar only supports global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        device = next(self.feature.parameters()).device
        self.classifier = self._make_classifier(num_classes).to(device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled feature map (N, 512, H/16, W/16)."""
        return self.feature(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global-average-pool, dropout and classify."""
        x = self.head_drop(torch.flatten(self.pool(x), 1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (2, 2),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "feature.0",
        "classifier": "classifier",
        **kwargs,
    }


# Must exist before @register_model runs: timm reads the module's ``default_cfgs``.
default_cfgs = generate_default_cfgs({"vgg19_bn_cifar": _cfg()})


@register_model
def vgg19_bn_cifar(pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    """CIFAR VGG-19-BN (GraSP/GraNet/Sup-tickets layout, ~20.0M params). No pretrained weights."""
    if pretrained:
        raise ValueError("vgg19_bn_cifar has no pretrained weights")
    kwargs.pop("cache_dir", None)
    return build_model_with_cfg(VGGCifar, "vgg19_bn_cifar", pretrained=False, cfg=VGG19_CFG, **kwargs)
