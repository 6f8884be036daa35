"""The fused augmentation kernel: one read of the source and one write of the output per image.

Hand-written because no library does this on the loader's CPU side at this
speed: numba compiles it, FFCV runs it on its loader thread, and `prange`
spreads the batch over the cores. Each sample draws its parameters
(`params.sample_params`); every output pixel is then an exact integer copy
(maps without rotation or scaling) or one bilinear sample of the source (fill
outside it), then the colour ops, then the output affine `v * scale + offset`:
normalisation for float output, `+ 0.5` rounding for uint8. Cutout boxes are
written last, and the first one is skipped by the sampling loop (a 16x16 box
is a quarter of a CIFAR image that need not be computed).

Speed notes (2-core numbers in the README): float32 arithmetic and fastmath
roughly halve the bilinear cost against float64; a source converted to float32
once (for maps that interpolate) saves three uint8 conversions per tap; a
generic per-pixel loop over the op list cost 10x, hence the per-sample flags.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .augmentations import CUTOUT, GRAY, RGBSHIFT
from .params import N_COLS, sample_params

_FAST = dict(cache=True, fastmath=True, error_model="numpy")


@njit(**_FAST)
def _colour(v0, v1, v2, p, codes):
    """Grayscale and RGB shift, in list order (rare: only samples that drew one get here)."""
    for k in range(codes.shape[0]):
        if p[k + 1, 0] == 0.0:
            continue
        if codes[k] == GRAY:
            luma = np.float32(0.299) * v0 + np.float32(0.587) * v1 + np.float32(0.114) * v2
            v0, v1, v2 = luma, luma, luma
        elif codes[k] == RGBSHIFT:
            v0 = min(max(v0 + np.float32(p[k + 1, 1]), np.float32(0.0)), np.float32(255.0))
            v1 = min(max(v1 + np.float32(p[k + 1, 2]), np.float32(0.0)), np.float32(255.0))
            v2 = min(max(v2 + np.float32(p[k + 1, 3]), np.float32(0.0)), np.float32(255.0))
    return v0, v1, v2


@njit(inline="always", **_FAST)
def _sample_row(img, out, y, x_start, x_end, m, integer, fill, colour, p, codes, scale, offset):
    """Output pixels [x_start, x_end) of row y."""
    h, w = img.shape[0], img.shape[1]
    a, b, c, d, e, f = m
    bx = b * np.float32(y) + c
    by = e * np.float32(y) + f
    one = np.float32(1.0)
    for x in range(x_start, x_end):
        sx = a * np.float32(x) + bx
        sy = d * np.float32(x) + by
        if integer:
            ix, iy = int(sx), int(sy)
            if 0 <= iy < h and 0 <= ix < w:
                v0 = np.float32(img[iy, ix, 0])
                v1 = np.float32(img[iy, ix, 1])
                v2 = np.float32(img[iy, ix, 2])
            else:
                v0, v1, v2 = fill[0], fill[1], fill[2]
        else:
            fx0 = np.floor(sx)
            fy0 = np.floor(sy)
            fx = sx - fx0
            fy = sy - fy0
            ix, iy = int(fx0), int(fy0)
            if ix >= 0 and ix + 1 < w and iy >= 0 and iy + 1 < h:
                top = img[iy, ix, 0] + fx * (img[iy, ix + 1, 0] - img[iy, ix, 0])
                bot = img[iy + 1, ix, 0] + fx * (img[iy + 1, ix + 1, 0] - img[iy + 1, ix, 0])
                v0 = top + fy * (bot - top)
                top = img[iy, ix, 1] + fx * (img[iy, ix + 1, 1] - img[iy, ix, 1])
                bot = img[iy + 1, ix, 1] + fx * (img[iy + 1, ix + 1, 1] - img[iy + 1, ix, 1])
                v1 = top + fy * (bot - top)
                top = img[iy, ix, 2] + fx * (img[iy, ix + 1, 2] - img[iy, ix, 2])
                bot = img[iy + 1, ix, 2] + fx * (img[iy + 1, ix + 1, 2] - img[iy + 1, ix, 2])
                v2 = top + fy * (bot - top)
            else:
                # Border: each of the four taps is the source pixel or the fill.
                v0 = v1 = v2 = np.float32(0.0)
                for dy in range(2):
                    wy = fy if dy else one - fy
                    for dx in range(2):
                        wt = wy * (fx if dx else one - fx)
                        jy, jx = iy + dy, ix + dx
                        if 0 <= jy < h and 0 <= jx < w:
                            v0 += wt * np.float32(img[jy, jx, 0])
                            v1 += wt * np.float32(img[jy, jx, 1])
                            v2 += wt * np.float32(img[jy, jx, 2])
                        else:
                            v0 += wt * fill[0]
                            v1 += wt * fill[1]
                            v2 += wt * fill[2]
        if colour:
            v0, v1, v2 = _colour(v0, v1, v2, p, codes)
        out[y, x, 0] = v0 * scale[0] + offset[0]
        out[y, x, 1] = v1 * scale[1] + offset[1]
        out[y, x, 2] = v2 * scale[2] + offset[2]


@njit(**_FAST)
def is_integer_map(m):
    """No rotation or scaling and integer offsets: every output pixel is an exact source pixel."""
    return (m[1] == 0.0 and m[3] == 0.0 and abs(m[0]) == 1.0 and abs(m[4]) == 1.0
            and m[2] == math.floor(m[2]) and m[5] == math.floor(m[5]))


@njit(**_FAST)
def warp_one(img, out, p, integer, codes, settings, fill64, scale64, offset64):
    """Augment one HWC image `img` into `out` with the parameters `p` of `sample_params`;
    `integer`: `is_integer_map(p[0])`, which the caller needs first to pick the source's dtype."""
    m64 = p[0]
    m = (np.float32(m64[0]), np.float32(m64[1]), np.float32(m64[2]),
         np.float32(m64[3]), np.float32(m64[4]), np.float32(m64[5]))
    fill = (np.float32(fill64[0]), np.float32(fill64[1]), np.float32(fill64[2]))
    scale = (np.float32(scale64[0]), np.float32(scale64[1]), np.float32(scale64[2]))
    offset = (np.float32(offset64[0]), np.float32(offset64[1]), np.float32(offset64[2]))
    colour = False
    box = -1
    for k in range(codes.shape[0]):
        if p[k + 1, 0] != 0.0:
            if codes[k] == GRAY or codes[k] == RGBSHIFT:
                colour = True
            elif codes[k] == CUTOUT and box < 0:
                box = k
    ho, wo = out.shape[0], out.shape[1]
    by0, bx0, bs = ho, wo, 0
    if box >= 0:
        by0, bx0, bs = int(p[box + 1, 1]), int(p[box + 1, 2]), int(settings[box, 0])
    for y in range(ho):
        if by0 <= y < by0 + bs:
            _sample_row(img, out, y, 0, bx0, m, integer, fill, colour, p, codes, scale, offset)
            _sample_row(img, out, y, bx0 + bs, wo, m, integer, fill, colour, p, codes, scale, offset)
        else:
            _sample_row(img, out, y, 0, wo, m, integer, fill, colour, p, codes, scale, offset)
    for k in range(codes.shape[0]):
        if codes[k] == CUTOUT and p[k + 1, 0] != 0.0:
            y0, x0, cs = int(p[k + 1, 1]), int(p[k + 1, 2]), int(settings[k, 0])
            for ch in range(3):
                out[y0:y0 + cs, x0:x0 + cs, ch] = settings[k, 2 + ch] * scale64[ch] + offset64[ch]


@njit(**_FAST)
def _to_float(img, out):
    """One vectorised conversion per source pixel, instead of one per bilinear tap (4 per output pixel)."""
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            for ch in range(3):
                out[y, x, ch] = np.float32(img[y, x, ch])


@njit(cache=True, parallel=True)
def augment_batch(src, dst, indices, codes, settings, in_size, seed, epoch, fill, scale, offset):
    """Augment a batch in parallel; `dst` is uint8 (rounded) or float (normalised) HWC."""
    k = codes.shape[0]
    for i in prange(src.shape[0]):
        p = np.empty((k + 1, N_COLS), dtype=np.float64)
        sample_params(codes, settings, in_size, seed, epoch, indices[i], p)
        if is_integer_map(p[0]):
            warp_one(src[i], dst[i], p, True, codes, settings, fill, scale, offset)
        else:
            img = np.empty(src.shape[1:], dtype=np.float32)  # the source as float32, for bilinear taps
            _to_float(src[i], img)
            warp_one(img, dst[i], p, False, codes, settings, fill, scale, offset)
    return dst
