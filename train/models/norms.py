"""The norm layers a model can take by name (`model.norm`); every model family looks its norm up with `norm_layer`.

Every norm has a per-channel affine, so the parameter count is the same as with BatchNorm.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from beton.errors import UserError


def _group_count(channels: int) -> int:
    """The largest usual group count that divides the channels."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "layer": lambda c: nn.GroupNorm(1, c),  # over (C, H, W) per sample: LayerNorm for conv nets
    "group": lambda c: nn.GroupNorm(_group_count(c), c),
    "instance": lambda c: nn.GroupNorm(c, c),  # per sample and channel, with affine
}


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    """The norm called `name` (a function of the channel count); an unknown name is a one-line UserError."""
    if name not in NORMS:
        raise UserError(f"unknown norm {name!r}; known: {', '.join(NORMS)}")
    return NORMS[name]
