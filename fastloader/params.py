"""Per-sample augmentation parameters, drawn from (seed, epoch, dataset index).

Both augmentation paths call `sample_params`: the numba kernel per sample
inside its prange, the torch path through `draw_params` for a whole batch.
Same inputs, same parameters, so the two paths give the same pixels.

Row 0 of a sample's parameters is the composed affine map from output pixel
coordinates (x, y) to source coordinates: (a, b, c, d, e, f) with
sx = a x + b y + c, sy = d x + e y + f (pixel centres at integers).
Row 1 + k holds what op k drew (crop offsets, flip, angle, cutout corner, ...).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .augmentations import CROP, CUTOUT, FLIP, GRAY, RGBSHIFT, ROTATE, SSR, AugTable
from .rng import sample_key, uniform

N_COLS = 6


@njit(cache=True, inline="always")
def _then(m, a, b, c, d, e, f):
    """m := m @ g for 2x3 affine maps (g applied first to output coordinates)."""
    m0, m1, m2, m3, m4, m5 = m[0], m[1], m[2], m[3], m[4], m[5]
    m[0] = m0 * a + m1 * d
    m[1] = m0 * b + m1 * e
    m[2] = m0 * c + m1 * f + m2
    m[3] = m3 * a + m4 * d
    m[4] = m3 * b + m4 * e
    m[5] = m3 * c + m4 * f + m5


@njit(cache=True, inline="always")
def _about_centre(m, cx, cy, a, b, d, e, tx, ty):
    """Compose the inverse map in = L (out - centre - t) + centre, with L = [[a, b], [d, e]]."""
    ox = cx - (a * (cx + tx) + b * (cy + ty))
    oy = cy - (d * (cx + tx) + e * (cy + ty))
    _then(m, a, b, ox, d, e, oy)


@njit(cache=True)
def sample_params(codes, settings, in_size, seed, epoch, index, out):
    """Fill `out` (K + 1 rows of N_COLS) for one sample; returns the output size."""
    key = sample_key(seed, epoch, index)
    m = out[0]
    m[:] = 0.0
    m[0] = 1.0
    m[4] = 1.0
    size = float(in_size)
    for j in range(codes.shape[0]):
        code = codes[j]
        s = settings[j]
        row = out[j + 1]
        k = j * 16 + code  # draw stream: position and type, so one-op pipelines stay independent
        row[:] = 0.0
        if code == CROP:
            crop, pad = s[0], s[1]
            span = size + 2.0 * pad - crop + 1.0
            ox = math.floor(uniform(key, k, 0) * span)
            oy = math.floor(uniform(key, k, 1) * span)
            row[0], row[1] = ox, oy
            _then(m, 1.0, 0.0, ox - pad, 0.0, 1.0, oy - pad)
            size = crop
        elif code == FLIP:
            if uniform(key, k, 0) < s[0]:
                row[0] = 1.0
                _then(m, -1.0, 0.0, size - 1.0, 0.0, 1.0, 0.0)
        elif code == ROTATE:
            if uniform(key, k, 1) < s[1]:
                angle = (2.0 * uniform(key, k, 0) - 1.0) * s[0]
                row[0], row[1] = 1.0, angle
                t = math.radians(angle)
                co, si = math.cos(t), math.sin(t)
                c = (size - 1.0) * 0.5
                # A counter-clockwise turn on screen (y down) reads its source at [[cos, -sin], [sin, cos]].
                _about_centre(m, c, c, co, -si, si, co, 0.0, 0.0)
        elif code == SSR:
            if uniform(key, k, 4) < s[3]:
                dx = (2.0 * uniform(key, k, 0) - 1.0) * s[0]
                dy = (2.0 * uniform(key, k, 1) - 1.0) * s[0]
                scale = 1.0 + (2.0 * uniform(key, k, 2) - 1.0) * s[1]
                angle = (2.0 * uniform(key, k, 3) - 1.0) * s[2]
                row[0], row[1], row[2], row[3], row[4] = 1.0, dx, dy, scale, angle
                t = math.radians(angle)
                co, si = math.cos(t) / scale, math.sin(t) / scale
                c = (size - 1.0) * 0.5
                _about_centre(m, c, c, co, -si, si, co, dx * size, dy * size)
        elif code == CUTOUT:
            cs = s[0]
            row[1] = math.floor(uniform(key, k, 0) * (size - cs + 1.0))
            row[2] = math.floor(uniform(key, k, 1) * (size - cs + 1.0))
            if uniform(key, k, 2) < s[1]:
                row[0] = 1.0
        elif code == GRAY:
            if uniform(key, k, 0) < s[0]:
                row[0] = 1.0
        elif code == RGBSHIFT:
            if uniform(key, k, 3) < s[3]:
                row[0] = 1.0
                for ch in range(3):
                    row[1 + ch] = (2.0 * uniform(key, k, ch) - 1.0) * s[ch]
    return size


@njit(cache=True, parallel=True)
def _draw_params(codes, settings, in_size, seed, epoch, indices, out):
    for i in prange(indices.shape[0]):
        sample_params(codes, settings, in_size, seed, epoch, indices[i], out[i])


def draw_params(table: AugTable, seed: int, epoch: int, indices) -> np.ndarray:
    """Parameters of a batch: (N, K + 1, N_COLS) float64, the same the kernel draws."""
    indices = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))
    out = np.empty((indices.shape[0], table.codes.shape[0] + 1, N_COLS), dtype=np.float64)
    _draw_params(table.codes, table.settings, table.in_size, np.int64(seed), np.int64(epoch), indices, out)
    return out
