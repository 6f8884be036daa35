"""random_crop: pad by `padding` on every side with `fill`, then crop `size` x `size` at a random offset.

A translation of the map (plus a smaller output), so with no rotation in the
pipeline the kernel copies integer pixels, bit-exact. `fill`: a grey, [r, g, b],
"mean" or "reflect" (BORDER_REFLECT_101, the mirror without repeating the
edge: exactly albumentations' PadIfNeeded(border_mode=cv2.BORDER_REFLECT_101)
then the crop); see augs/__init__.py for fills shared with rotations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from numba import njit

from beton.errors import UserError

from ..rng import uniform
from .base import GEOMETRIC, MEAN, REFLECT, Aug, Op, draws, fill3, nonneg, settings_layout, then


@dataclass(frozen=True)
class RandomCrop(Aug):
    """Pad by `padding` on every side with `fill`, then crop `size` x `size` at a random offset."""

    size: int = 32
    padding: int = 4
    fill: tuple = (0.0, 0.0, 0.0)
    code = 0  # pre-registry code: keeps its draws
    kind = GEOMETRIC

    def __post_init__(self):
        nonneg(self.size, "RandomCrop.size", integer=True)
        nonneg(self.padding, "RandomCrop.padding", integer=True)
        if self.size < 1:
            raise UserError(f"RandomCrop.size must be at least 1, got {self.size}")
        object.__setattr__(self, "fill", fill3(self.fill, "RandomCrop", (MEAN, REFLECT)))

    def geometric_fill(self):
        return self.fill if self.padding > 0 else None

    def out_size(self, size):
        if self.size > size + 2 * self.padding:
            raise UserError(f"RandomCrop.size {self.size} is larger than the padded image ({size} + 2 x {self.padding})")
        return self.size


S = settings_layout(RandomCrop)
D = draws("x", "y")  # the crop's top-left corner in the padded image


@njit
def sample(key, stream, s, size, row, m):
    crop, pad = s[S.size], s[S.padding]
    span = size + 2.0 * pad - crop + 1.0
    ox = math.floor(uniform(key, stream, 0) * span)
    oy = math.floor(uniform(key, stream, 1) * span)
    row[D.x], row[D.y] = ox, oy
    then(m, 1.0, 0.0, ox - pad, 0.0, 1.0, oy - pad)
    return crop


OP = Op(RandomCrop, sample, D)
