"""Small models shared by the unit tests."""

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-BN-conv-BN-linear: BatchNorm, conv and linear targets, fast on CPU."""

    TARGETS = ["conv1.weight", "conv2.weight", "fc.weight"]

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))
