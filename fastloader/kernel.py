"""The fused augmentation kernel: one read of the source and one write of the output per image.

Hand-written because no library does this on the loader's CPU side at this
speed: numba compiles it, FFCV runs it on its loader thread, and `prange`
spreads the batch over the cores. Each sample draws its parameters
(`params.sample_params`); every output pixel is then an exact integer copy
(maps without rotation or scaling) or one bilinear sample of the source (fill
outside it, or with `border` BORDER_REFLECT its mirror, BORDER_REFLECT_101),
then the colour ops, then the output affine `v * scale + offset`:
normalisation for float output, `+ 0.5` rounding for uint8. Cutout boxes are
written last, and the first one is skipped by the sampling loop (a 16x16 box
is a quarter of a CIFAR image that need not be computed).

Speed notes (2-core numbers in docs/benchmarks.md): float32 arithmetic and fastmath
roughly halve the bilinear cost against float64; a source converted to float32
once (for maps that interpolate) saves three uint8 conversions per tap; a
generic per-pixel loop over the op list cost 10x, hence the per-sample flags.

The kernel knows op kinds, not ops: geometric ops are already in the map,
colour ops run through `dispatch.colour_op` on pixels of samples where they
fired, and box ops declare their rectangle (`dispatch.box_op`). Functions
that reach an op are not cached on their own; the entry point `augment_batch`
is, salted with the ops' source (see dispatch.SALT).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .augs import N_COLS
from .augs.base import ACTIVE, BORDER_REFLECT, BOX, COLOUR
from .augs.dispatch import SALT, box_op, colour_op, kind_of
from .params import sample_params

_FAST = dict(fastmath=True, error_model="numpy")


@njit(**_FAST)
def _colour(v0, v1, v2, p, codes, settings):
    """The colour ops that fired, in list order (rare: only samples that drew one get here)."""
    for k in range(codes.shape[0]):
        if p[k + 1, ACTIVE] != 0.0:
            v0, v1, v2 = colour_op(codes[k], v0, v1, v2, p[k + 1], settings[k])
    return v0, v1, v2


@njit
def _reflect_far(i, n):
    """reflect101 beyond one mirror: mirror again until inside (cv2.borderInterpolate's loop); rare."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        if i < 0:
            i = -i
        if i >= n:
            i = 2 * n - 2 - i
    return i


@njit(inline="always")
def reflect101(i, n):
    """Source index `i` outside [0, n) read as OpenCV's BORDER_REFLECT_101 (-1 -> 1, n -> n - 2), repeated
    (as cv2.borderInterpolate does) for indices more than one image away."""
    i = abs(i)
    i = min(i, 2 * n - 2 - i)  # exact within one mirror of the image (every crop padding below its size)
    return i if i >= 0 else _reflect_far(i, n)


@njit(**_FAST)
def _sample_row(img, out, y, x_start, x_end, m, integer, fill, reflect, colour, p, codes, settings, scale, offset):
    """Output pixels [x_start, x_end) of row y; outside the source, `fill` or (`reflect`) its mirror."""
    h, w = img.shape[0], img.shape[1]
    a, b, c, d, e, f = m
    bx = b * np.float32(y) + c
    by = e * np.float32(y) + f
    one = np.float32(1.0)
    ry = reflect101(int(by), h) if integer and reflect else 0
    for x in range(x_start, x_end):
        sx = a * np.float32(x) + bx
        sy = d * np.float32(x) + by
        if integer:
            ix, iy = int(sx), int(sy)
            if reflect:  # an integer map reads one source row (d = 0), mirrored once above
                if not 0 <= ix < w:
                    ix = reflect101(ix, w)
                v0 = np.float32(img[ry, ix, 0])
                v1 = np.float32(img[ry, ix, 1])
                v2 = np.float32(img[ry, ix, 2])
            elif 0 <= iy < h and 0 <= ix < w:
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
            elif reflect:
                # Border, mirrored: the interior's formula on the four taps' mirrored indices.
                x0, x1 = reflect101(ix, w), reflect101(ix + 1, w)
                y0, y1 = reflect101(iy, h), reflect101(iy + 1, h)
                top = img[y0, x0, 0] + fx * (img[y0, x1, 0] - img[y0, x0, 0])
                bot = img[y1, x0, 0] + fx * (img[y1, x1, 0] - img[y1, x0, 0])
                v0 = top + fy * (bot - top)
                top = img[y0, x0, 1] + fx * (img[y0, x1, 1] - img[y0, x0, 1])
                bot = img[y1, x0, 1] + fx * (img[y1, x1, 1] - img[y1, x0, 1])
                v1 = top + fy * (bot - top)
                top = img[y0, x0, 2] + fx * (img[y0, x1, 2] - img[y0, x0, 2])
                bot = img[y1, x0, 2] + fx * (img[y1, x1, 2] - img[y1, x0, 2])
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
            v0, v1, v2 = _colour(v0, v1, v2, p, codes, settings)
        out[y, x, 0] = v0 * scale[0] + offset[0]
        out[y, x, 1] = v1 * scale[1] + offset[1]
        out[y, x, 2] = v2 * scale[2] + offset[2]


@njit(**_FAST)
def _rows(img, out, m, integer, fill, reflect, colour, p, codes, settings, scale, offset, by0, bx0, bh, bw):
    """Every output row, less the box [by0, by0 + bh) x [bx0, bx0 + bw)."""
    ho, wo = out.shape[0], out.shape[1]
    for y in range(ho):
        beside_box = by0 <= y < by0 + bh
        for part in range(2 if beside_box else 1):  # the row's parts left and right of the box
            x_start = bx0 + bw if part == 1 else 0
            x_end = bx0 if beside_box and part == 0 else wo
            _sample_row(img, out, y, x_start, x_end, m, integer, fill, reflect, colour, p, codes, settings, scale,
                        offset)


@njit(cache=True, **_FAST)
def is_integer_map(m):
    """No rotation or scaling and integer offsets: every output pixel is an exact source pixel."""
    return (m[1] == 0.0 and m[3] == 0.0 and abs(m[0]) == 1.0 and abs(m[4]) == 1.0
            and m[2] == math.floor(m[2]) and m[5] == math.floor(m[5]))


@njit(**_FAST)
def warp_one(img, out, p, integer, codes, settings, fill64, scale64, offset64, border):
    """Augment one HWC image `img` into `out` with the parameters `p` of `sample_params`;
    `integer`: `is_integer_map(p[0])`, which the caller needs first to pick the source's dtype;
    `border`: BORDER_CONSTANT (`fill64` outside the source) or BORDER_REFLECT."""
    m64 = p[0]
    m = (np.float32(m64[0]), np.float32(m64[1]), np.float32(m64[2]),
         np.float32(m64[3]), np.float32(m64[4]), np.float32(m64[5]))
    fill = (np.float32(fill64[0]), np.float32(fill64[1]), np.float32(fill64[2]))
    scale = (np.float32(scale64[0]), np.float32(scale64[1]), np.float32(scale64[2]))
    offset = (np.float32(offset64[0]), np.float32(offset64[1]), np.float32(offset64[2]))
    reflect = border == BORDER_REFLECT
    colour = False
    box = -1
    for k in range(codes.shape[0]):
        if p[k + 1, ACTIVE] != 0.0:
            kind = kind_of(codes[k])
            if kind == COLOUR:
                colour = True
            elif kind == BOX and box < 0:
                box = k
    ho, wo = out.shape[0], out.shape[1]
    by0, bx0, bh, bw = ho, wo, 0, 0
    if box >= 0:  # the first box's pixels are not sampled: it overwrites them below
        by0, bx0, bh, bw, _, _, _ = box_op(codes[box], p[box + 1], settings[box])
        by0, bx0 = min(max(by0, 0), ho), min(max(bx0, 0), wo)
        bh, bw = min(max(bh, 0), ho - by0), min(max(bw, 0), wo - bx0)
    # `_rows` and `_sample_row` are called, not inlined (numba's inline="always"): `colour` and `reflect` are
    # run-time flags, and numba's cold compile of one signature fell from 24-31 s to 17 s (2-core Xeon) with the
    # same kernel images/s (crop + flip, 2,048 images: 376-403k vs 303-396k); specialised copies of the row
    # loop per flag tripled it before (34 s -> 103 s on a 2-core AMD EPYC) for no measurable speed.
    _rows(img, out, m, integer, fill, reflect, colour, p, codes, settings, scale, offset, by0, bx0, bh, bw)
    for k in range(codes.shape[0]):
        if p[k + 1, ACTIVE] != 0.0 and kind_of(codes[k]) == BOX:
            y0, x0, h, w, r, g, b = box_op(codes[k], p[k + 1], settings[k])
            y1, x1 = min(max(y0 + h, 0), ho), min(max(x0 + w, 0), wo)
            y0, x0 = min(max(y0, 0), ho), min(max(x0, 0), wo)
            out[y0:y1, x0:x1, 0] = r * scale64[0] + offset64[0]
            out[y0:y1, x0:x1, 1] = g * scale64[1] + offset64[1]
            out[y0:y1, x0:x1, 2] = b * scale64[2] + offset64[2]


@njit(cache=True, **_FAST)
def _to_float(img, out):
    """One vectorised conversion per source pixel, instead of one per bilinear tap (4 per output pixel)."""
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            for ch in range(3):
                out[y, x, ch] = np.float32(img[y, x, ch])


def _compile(salt):
    """The cached entry point, with `salt` (dispatch.SALT) in numba's cache key."""
    @njit(cache=True, parallel=True, nogil=True)  # nogil: FFCV's loader thread calls it from Python
    def augment_batch(src, dst, indices, codes, settings, in_size, seed, epoch, fill, scale, offset, border):
        """Augment a batch in parallel; `dst` is uint8 (rounded) or float (normalised) HWC; `border`:
        the table's (`AugTable.border`, an int64: BORDER_CONSTANT or BORDER_REFLECT). Required, not
        defaulted: an omitted argument is another numba signature, compiled again (17 s cold); so is a
        writable table where FFCV's pipeline hands read-only ones, or uint64 indices: see `frozen`."""
        salt  # noqa: B018 (a closure value: see dispatch.SALT)
        k = codes.shape[0]
        for i in prange(src.shape[0]):
            p = np.empty((k + 1, N_COLS), dtype=np.float64)
            sample_params(codes, settings, in_size, seed, epoch, indices[i], p)
            if is_integer_map(p[0]):
                warp_one(src[i], dst[i], p, True, codes, settings, fill, scale, offset, border)
            else:
                img = np.empty(src.shape[1:], dtype=np.float32)  # the source as float32, for bilinear taps
                _to_float(src[i], img)
                warp_one(img, dst[i], p, False, codes, settings, fill, scale, offset, border)
        return dst
    return augment_batch


augment_batch = _compile(SALT)


def frozen(*arrays) -> tuple[np.ndarray, ...]:
    """Read-only float64 copies, as the loader's op hands its constant arrays to the kernel:
    a direct call (`scale`, `offset`; `pack` freezes the table) then reuses the loader's compiled
    signature instead of compiling its own."""
    out = []
    for a in arrays:
        a = np.array(a, dtype=np.float64)
        a.setflags(write=False)
        out.append(a)
    return tuple(out)
