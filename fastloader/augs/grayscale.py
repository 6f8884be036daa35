"""grayscale: replace RGB by luma (0.299 R + 0.587 G + 0.114 B) with probability p."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..rng import uniform
from .base import COLOUR, Aug, Op, draws, prob, settings_layout


@dataclass(frozen=True)
class Grayscale(Aug):
    """Replace RGB by luma (0.299 R + 0.587 G + 0.114 B) with probability p."""

    p: float = 0.2
    code = 5  # pre-registry code: keeps its draws
    kind = COLOUR

    def __post_init__(self):
        prob(self.p, "Grayscale")


S = settings_layout(Grayscale)
D = draws("active")


@njit
def sample(key, stream, s, size, row, m):
    if uniform(key, stream, 0) < s[S.p]:
        row[D.active] = 1.0
    return size


@njit
def colour(v0, v1, v2, row, s):
    luma = np.float32(0.299) * v0 + np.float32(0.587) * v1 + np.float32(0.114) * v2
    return luma, luma, luma


def colour_torch(out, rows, s, active):
    luma = (out * out.new_tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    out.copy_(luma.expand_as(out).where(active, out))


OP = Op(Grayscale, sample, D, colour=colour, colour_torch=colour_torch)
