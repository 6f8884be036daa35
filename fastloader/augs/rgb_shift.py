"""rgb_shift: add to each channel a shift uniform in [-limit, limit] (0-255 scale), then clip, with probability p."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..rng import uniform
from .base import COLOUR, Aug, Op, draws, nonneg, prob, settings_layout


@dataclass(frozen=True)
class RGBShift(Aug):
    """Add to each channel a shift uniform in [-limit, limit] (0-255 scale), then clip."""

    r_shift_limit: float = 20.0
    g_shift_limit: float = 20.0
    b_shift_limit: float = 20.0
    p: float = 0.5
    code = 6  # pre-registry code: keeps its draws
    kind = COLOUR

    def __post_init__(self):
        for f in ("r_shift_limit", "g_shift_limit", "b_shift_limit"):
            nonneg(getattr(self, f), f"RGBShift.{f}")
        prob(self.p, "RGBShift")


S = settings_layout(RGBShift)
D = draws("active", "r", "g", "b")


@njit
def sample(key, stream, s, size, row, m):
    if uniform(key, stream, 3) < s[S.p]:
        row[D.active] = 1.0
        row[D.r] = (2.0 * uniform(key, stream, 0) - 1.0) * s[S.r_shift_limit]
        row[D.g] = (2.0 * uniform(key, stream, 1) - 1.0) * s[S.g_shift_limit]
        row[D.b] = (2.0 * uniform(key, stream, 2) - 1.0) * s[S.b_shift_limit]
    return size


@njit
def colour(v0, v1, v2, row, s):
    lo, hi = np.float32(0.0), np.float32(255.0)
    v0 = min(max(v0 + np.float32(row[D.r]), lo), hi)
    v1 = min(max(v1 + np.float32(row[D.g]), lo), hi)
    v2 = min(max(v2 + np.float32(row[D.b]), lo), hi)
    return v0, v1, v2


def colour_torch(out, rows, s, active):
    shifted = (out + rows[:, D.r:D.b + 1].view(-1, 1, 1, 3)).clamp(0, 255)
    out.copy_(shifted.where(active, out))


OP = Op(RGBShift, sample, D, colour=colour, colour_torch=colour_torch)
