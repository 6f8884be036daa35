"""cutout: fill a `size` x `size` square, placed uniformly and wholly inside the image, with `fill`.

`fill`: a grey, [r, g, b] (0..255), or "mean": the training split's per-channel
mean from the manifest (albumentations users pass it to CoarseDropout as `fill`).

A box op: the kernel skips sampling the first box's pixels (a 16 x 16 box is a
quarter of a CIFAR image) and writes every box after everything else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from numba import njit

from beton.errors import UserError

from ..rng import uniform
from .base import BOX, Aug, Op, draws, fill3, nonneg, prob, settings_layout


@dataclass(frozen=True)
class Cutout(Aug):
    """Fill a `size` x `size` square, placed uniformly and wholly inside the image, with `fill`."""

    size: int = 16
    fill: tuple = (0.0, 0.0, 0.0)
    p: float = 1.0
    code = 4  # pre-registry code: keeps its draws
    kind = BOX

    def __post_init__(self):
        nonneg(self.size, "Cutout.size", integer=True)
        prob(self.p, "Cutout")
        object.__setattr__(self, "fill", fill3(self.fill, "Cutout"))

    def out_size(self, size):
        if self.size > size:
            raise UserError(f"Cutout.size {self.size} is larger than the image ({size})")
        return size


S = settings_layout(Cutout)
D = draws("active", "y", "x")


@njit
def sample(key, stream, s, size, row, m):
    cs = s[S.size]
    row[D.y] = math.floor(uniform(key, stream, 0) * (size - cs + 1.0))
    row[D.x] = math.floor(uniform(key, stream, 1) * (size - cs + 1.0))
    if uniform(key, stream, 2) < s[S.p]:
        row[D.active] = 1.0
    return size


@njit
def box(row, s):
    cs = int(s[S.size])
    return int(row[D.y]), int(row[D.x]), cs, cs, s[S.fill], s[S.fill + 1], s[S.fill + 2]


def box_torch(rows, s):
    cs = float(s[S.size])
    return rows[:, D.y], rows[:, D.x], cs, cs, s[S.fill:S.fill + 3]


OP = Op(Cutout, sample, D, box=box, box_torch=box_torch)
