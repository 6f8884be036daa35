"""CIFAR ResNet18/34: torchvision's BasicBlock ResNet for 32x32 inputs (3x3 stride-1 stem, no max-pool)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from beton.errors import UserError

from .norms import norm_layer


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)



class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = norm(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, four stages of BasicBlocks."""

    WIDTHS = (64, 128, 256, 512)
    STRIDES = (1, 2, 2, 2)  # torchvision's and kuangliu's layout; seed A's code ran (1, 1, 2, 2)

    def __init__(self, depths: tuple[int, ...], num_classes: int, norm: Callable[[int], nn.Module],
                 strides: tuple[int, ...] | None = None):
        super().__init__()
        strides = tuple(strides or self.STRIDES)
        if len(strides) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v in (1, 2)
                                        for v in strides):
            raise UserError(f"model.strides must be four strides of 1 or 2 (one per layer), got {list(strides)}")
        self.stem = nn.Sequential(conv3x3(3, 64), norm(64), nn.ReLU(inplace=True))
        cin = 64
        for i, (width, stride, depth) in enumerate(zip(self.WIDTHS, strides, depths), start=1):
            blocks = [BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1, norm) for j in range(depth)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.pool = nn.AdaptiveAvgPool2d(1)  # whatever map remains (8x8 with strides 1, 1, 2, 2; 4x4 with 1, 2, 2, 2)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 10, norm: str = "batch", strides=None) -> nn.Module:
    return CifarResNet((2, 2, 2, 2), num_classes, norm_layer(norm), strides)


def resnet34(num_classes: int = 10, norm: str = "batch", strides=None) -> nn.Module:
    return CifarResNet((3, 4, 6, 3), num_classes, norm_layer(norm), strides)
