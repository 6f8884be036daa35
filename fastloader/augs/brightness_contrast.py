"""brightness_contrast: shift the image by one brightness draw, then scale it about `centre` by one contrast draw.

hiverge/cifar10-speedrun's colour jitter (the new augmentation of its CIFAR-10 record) draws per image a shift
b in [-brightness, brightness] and a factor c in [1 - contrast, 1 + contrast], and maps each normalised pixel x
to (x + b) c. Ops here act on the 0..255 scale before normalisation, so the same map is
v -> centre + (v - centre + b) c with `centre: mean` (the training mean, about which normalised pixels are 0)
and b on the 0..255 scale: its 0.14 standard deviations and 0.13 are about `brightness: 9, contrast: 0.13`
on CIFAR-10 (std 62-66). The result is clipped to 0..255 (uint8 batches need it; hiverge does not clip).
The default centre is mid-grey, so that the op packs without a training mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from beton.errors import UserError

from ..rng import uniform
from .base import COLOUR, Aug, Op, code_for, draws, fill3, nonneg, prob, settings_layout


@dataclass(frozen=True)
class BrightnessContrast(Aug):
    """Shift by a brightness draw in [-brightness, brightness] (0..255), scale about `centre` by a contrast draw
    in [1 - contrast, 1 + contrast], clip to 0..255."""

    brightness: float = 9.0
    contrast: float = 0.13
    centre: tuple = (128.0, 128.0, 128.0)
    p: float = 1.0
    code = code_for("brightness_contrast")
    kind = COLOUR

    def __post_init__(self):
        nonneg(self.brightness, "BrightnessContrast.brightness")
        nonneg(self.contrast, "BrightnessContrast.contrast")
        if self.contrast >= 1:
            raise UserError(f"BrightnessContrast.contrast must be below 1 (a factor in [1 - c, 1 + c]), "
                            f"got {self.contrast!r}")
        prob(self.p, "BrightnessContrast")
        object.__setattr__(self, "centre", fill3(self.centre, "BrightnessContrast"))


S = settings_layout(BrightnessContrast)
D = draws("active", "shift", "factor")


@njit
def sample(key, stream, s, size, row, m):
    if uniform(key, stream, 2) < s[S.p]:
        row[D.active] = 1.0
        row[D.shift] = (2.0 * uniform(key, stream, 0) - 1.0) * s[S.brightness]
        row[D.factor] = 1.0 + (2.0 * uniform(key, stream, 1) - 1.0) * s[S.contrast]
    return size


@njit
def colour(v0, v1, v2, row, s):
    shift, factor = np.float32(row[D.shift]), np.float32(row[D.factor])
    lo, hi = np.float32(0.0), np.float32(255.0)
    c0, c1, c2 = np.float32(s[S.centre]), np.float32(s[S.centre + 1]), np.float32(s[S.centre + 2])
    v0 = min(max(c0 + (v0 - c0 + shift) * factor, lo), hi)
    v1 = min(max(c1 + (v1 - c1 + shift) * factor, lo), hi)
    v2 = min(max(c2 + (v2 - c2 + shift) * factor, lo), hi)
    return v0, v1, v2


def colour_torch(out, rows, s, active):
    centre = out.new_tensor(np.array(s[S.centre:S.centre + 3], dtype=np.float32))
    shift = rows[:, D.shift].to(out.dtype).view(-1, 1, 1, 1)
    factor = rows[:, D.factor].to(out.dtype).view(-1, 1, 1, 1)
    jittered = (centre + (out - centre + shift) * factor).clamp(0, 255)
    out.copy_(jittered.where(active, out))


OP = Op(BrightnessContrast, sample, D, colour=colour, colour_torch=colour_torch)
