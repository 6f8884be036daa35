"""flip: mirror left-right with probability p (an exact map: columns reversed)."""
from __future__ import annotations

from dataclasses import dataclass

from numba import njit

from ..rng import uniform
from .base import GEOMETRIC, Aug, Op, draws, prob, settings_layout, then


@dataclass(frozen=True)
class RandomHorizontalFlip(Aug):
    p: float = 0.5
    code = 1  # pre-registry code: keeps its draws
    kind = GEOMETRIC

    def __post_init__(self):
        prob(self.p, "RandomHorizontalFlip")


S = settings_layout(RandomHorizontalFlip)
D = draws("flipped")


@njit
def sample(key, stream, s, size, row, m):
    if uniform(key, stream, 0) < s[S.p]:
        row[D.flipped] = 1.0
        then(m, -1.0, 0.0, size - 1.0, 0.0, 1.0, 0.0)
    return size


OP = Op(RandomHorizontalFlip, sample, D)
