"""The course assignment's custom ResNet: prep, residual layer, plain layer, residual layer, MaxPool(4), fc."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .norms import norm_layer
from .resnet import conv3x3


def _conv_norm_relu(cin: int, cout: int, norm: Callable[[int], nn.Module], pool: bool = False) -> nn.Sequential:
    """conv3x3 [-> MaxPool2] -> norm -> ReLU; pooling before the norm as in the assignment."""
    layers = [conv3x3(cin, cout)] + ([nn.MaxPool2d(2)] if pool else []) + [norm(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResidualLayer(nn.Module):
    """X = conv-pool-norm-ReLU(x); out = X + ResBlock(X), the ResBlock being two conv-norm-ReLUs."""

    def __init__(self, cin: int, cout: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv = _conv_norm_relu(cin, cout, norm, pool=True)
        self.res = nn.Sequential(_conv_norm_relu(cout, cout, norm), _conv_norm_relu(cout, cout, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x + self.res(x)


class CustomResNet(nn.Module):
    """The course assignment's 9-conv ResNet (prep, residual, plain, residual, MaxPool(4), fc)."""

    def __init__(self, num_classes: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.prep = _conv_norm_relu(3, 64, norm)
        self.layer1 = ResidualLayer(64, 128, norm)
        self.layer2 = _conv_norm_relu(128, 256, norm, pool=True)
        self.layer3 = ResidualLayer(256, 512, norm)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def custom_resnet(num_classes: int = 10, norm: str = "batch") -> nn.Module:
    return CustomResNet(num_classes, norm_layer(norm))
