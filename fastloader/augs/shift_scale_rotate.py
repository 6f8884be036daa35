"""shift_scale_rotate: albumentations' ShiftScaleRotate as one affine map about the centre.

Shift is a fraction of the image size, scale 1 +- scale_limit, rotation
+- rotate_limit degrees, all drawn together with probability p: the forward
map is cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale) plus
the shift. `fill`: a grey, [r, g, b], "mean" or "reflect" (BORDER_REFLECT_101).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from numba import njit

from beton.errors import UserError

from ..rng import uniform
from .base import GEOMETRIC, MEAN, REFLECT, Aug, Op, about_centre, draws, fill3, nonneg, prob, settings_layout


@dataclass(frozen=True)
class ShiftScaleRotate(Aug):
    """albumentations' ShiftScaleRotate: shift (fraction of size), scale 1 +- scale_limit, rotate +- rotate_limit."""

    shift_limit: float = 0.0625
    scale_limit: float = 0.1
    rotate_limit: float = 45.0
    fill: tuple = (0.0, 0.0, 0.0)
    p: float = 0.5
    code = 3  # pre-registry code: keeps its draws
    kind = GEOMETRIC

    def __post_init__(self):
        nonneg(self.shift_limit, "ShiftScaleRotate.shift_limit")
        nonneg(self.rotate_limit, "ShiftScaleRotate.rotate_limit")
        if not isinstance(self.scale_limit, (int, float)) or not 0 <= self.scale_limit < 1:
            raise UserError(f"ShiftScaleRotate.scale_limit must be in [0, 1), got {self.scale_limit!r}")
        prob(self.p, "ShiftScaleRotate")
        object.__setattr__(self, "fill", fill3(self.fill, "ShiftScaleRotate", (MEAN, REFLECT)))

    def geometric_fill(self):
        return self.fill


S = settings_layout(ShiftScaleRotate)
D = draws("active", "dx", "dy", "scale", "angle")


@njit
def sample(key, stream, s, size, row, m):
    if uniform(key, stream, 4) < s[S.p]:
        dx = (2.0 * uniform(key, stream, 0) - 1.0) * s[S.shift_limit]
        dy = (2.0 * uniform(key, stream, 1) - 1.0) * s[S.shift_limit]
        scale = 1.0 + (2.0 * uniform(key, stream, 2) - 1.0) * s[S.scale_limit]
        angle = (2.0 * uniform(key, stream, 3) - 1.0) * s[S.rotate_limit]
        row[D.active], row[D.dx], row[D.dy], row[D.scale], row[D.angle] = 1.0, dx, dy, scale, angle
        t = math.radians(angle)
        co, si = math.cos(t) / scale, math.sin(t) / scale
        c = (size - 1.0) * 0.5
        about_centre(m, c, c, co, -si, si, co, dx * size, dy * size)
    return size


OP = Op(ShiftScaleRotate, sample, D)
