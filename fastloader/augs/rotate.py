"""rotate: turn about the image centre by an angle uniform in [-max_degrees, max_degrees].

Positive angles turn counter-clockwise on screen, as torchvision's rotate and
albumentations' Rotate (cv2.getRotationMatrix2D) do, about the centre
((w - 1) / 2, (h - 1) / 2) that albumentations 2 uses. `fill`: a grey,
[r, g, b], "mean" or "reflect" (BORDER_REFLECT_101); see augs/__init__.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from numba import njit

from ..rng import uniform
from .base import GEOMETRIC, MEAN, REFLECT, Aug, Op, about_centre, draws, fill3, nonneg, prob, settings_layout


@dataclass(frozen=True)
class RandomRotate(Aug):
    """Rotate about the image centre by an angle uniform in [-max_degrees, max_degrees] (positive: counter-clockwise)."""

    max_degrees: float = 5.0
    fill: tuple = (0.0, 0.0, 0.0)
    p: float = 1.0
    code = 2  # pre-registry code: keeps its draws
    kind = GEOMETRIC

    def __post_init__(self):
        nonneg(self.max_degrees, "RandomRotate.max_degrees")
        prob(self.p, "RandomRotate")
        object.__setattr__(self, "fill", fill3(self.fill, "RandomRotate", (MEAN, REFLECT)))

    def geometric_fill(self):
        return self.fill


S = settings_layout(RandomRotate)
D = draws("active", "angle")


@njit
def sample(key, stream, s, size, row, m):
    if uniform(key, stream, 1) < s[S.p]:
        angle = (2.0 * uniform(key, stream, 0) - 1.0) * s[S.max_degrees]
        row[D.active], row[D.angle] = 1.0, angle
        t = math.radians(angle)
        co, si = math.cos(t), math.sin(t)
        c = (size - 1.0) * 0.5
        # A counter-clockwise turn on screen (y down) reads its source at [[cos, -sin], [sin, cos]].
        about_centre(m, c, c, co, -si, si, co, 0.0, 0.0)
    return size


OP = Op(RandomRotate, sample, D)
