"""FastNet: the small net `make run` trains on a CPU in minutes."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .norms import norm_layer
from .resnet import conv3x3


class FastNet(nn.Module):
    """A small net for minutes-long CPU runs (what `make run` trains), shaped like airbench's.

    stem conv3x3-norm-GELU, then three blocks of conv3x3-MaxPool2-norm-GELU-conv3x3-norm-GELU
    (32 -> 16 -> 8 -> 4 pixels), global max pool, linear. About 0.7 M parameters.
    """

    WIDTHS = (24, 48, 96, 192)

    def __init__(self, num_classes: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        w = self.WIDTHS
        self.stem = nn.Sequential(conv3x3(3, w[0]), norm(w[0]), nn.GELU())
        self.layer1, self.layer2, self.layer3 = (self._block(w[i], w[i + 1], norm) for i in range(3))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)

    @staticmethod
    def _block(cin: int, cout: int, norm) -> nn.Sequential:
        return nn.Sequential(conv3x3(cin, cout), nn.MaxPool2d(2), norm(cout), nn.GELU(),
                             conv3x3(cout, cout), norm(cout), nn.GELU())

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def fastnet(num_classes: int = 10, norm: str = "batch") -> nn.Module:
    return FastNet(num_classes, norm_layer(norm))
