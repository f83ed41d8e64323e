"""CIFAR ResNet-32 (He et al. 2016, Sec. 4.2), registered with timm as ``resnet32_cifar``.

3x3 stem with 16 channels, three stages of 5 BasicBlocks (16, 32, 64 channels, stride 1/2/2),
1x1-conv + BN shortcuts where the shape changes ("option B"), global average pool, linear head:
0.46 M conv/linear weights. Small enough for end-to-end CPU benchmarks and short studies.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["ResNetCifar"]


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.downsample(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``depth=32`` gives n = 5 blocks per stage."""

    def __init__(
        self,
        depth: int = 32,
        widths: tuple[int, int, int] = (16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if global_pool != "avg":
            raise ValueError(f"ResNetCifar only supports global_pool='avg', got {global_pool!r}")
        n = (depth - 2) // 6
        self.num_classes, self.drop_rate, self.global_pool = num_classes, drop_rate, global_pool
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        stages, chans = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(chans if j == 0 else w, w, 2 if i and j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            chans = w
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = self.head_hidden_size = chans
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(chans, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"ResNetCifar only supports global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(torch.flatten(self.pool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {
        "resnet32_cifar": {
            "url": "",
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "pool_size": (8, 8),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": (0.4914, 0.4822, 0.4465),
            "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "conv1",
            "classifier": "fc",
        }
    }
)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """CIFAR ResNet-32 with 1x1-conv shortcuts (0.46 M conv/linear weights). No pretrained weights."""
    if pretrained:
        raise ValueError("resnet32_cifar has no pretrained weights")
    kwargs.pop("cache_dir", None)
    return build_model_with_cfg(ResNetCifar, "resnet32_cifar", pretrained=False, depth=32, **kwargs)
