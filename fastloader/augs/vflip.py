"""vflip: mirror top-bottom with probability p; the example of adding an op (this file, one registry line)."""
from __future__ import annotations

from dataclasses import dataclass

from numba import njit

from ..rng import uniform
from .base import GEOMETRIC, Aug, Op, code_for, draws, prob, settings_layout, then


@dataclass(frozen=True)
class RandomVerticalFlip(Aug):
    p: float = 0.5
    code = code_for("vflip")
    kind = GEOMETRIC

    def __post_init__(self):
        prob(self.p, "RandomVerticalFlip")


S = settings_layout(RandomVerticalFlip)
D = draws("flipped")


@njit
def sample(key, stream, s, size, row, m):
    if uniform(key, stream, 0) < s[S.p]:
        row[D.flipped] = 1.0
        then(m, 1.0, 0.0, 0.0, 0.0, -1.0, size - 1.0)
    return size


OP = Op(RandomVerticalFlip, sample, D)
