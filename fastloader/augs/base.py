"""What every augmentation module provides, and the pieces they share.

An op is one module of this package: its spec (a frozen dataclass: the config
entry's parameters, defaults, validation), a numba `sample` that draws one
sample's parameters, and, for ops that change pixels rather than coordinates,
their pixel code for the numba kernel and for the torch path. The module ends
with `OP = Op(...)`; `augs/__init__.py` lists the module.

Settings are addressed by name: `settings_layout(Spec)` gives each dataclass
field a column of the packed settings row (a field whose default is a tuple,
an RGB fill, takes three), as a namedtuple the numba code reads as a constant
(`s[S.size]`, `s[S.fill + ch]`), so no kernel knows a column number.
`draws(...)` names the columns of the row each op writes its draws to (the
row the tests and the torch path read).

The op's `code` keys its draw stream (`rng.stream`), so it must never change:
the seven ops older than the registry keep their codes 0..6, and a new op
takes `code_for(its config name)`.
"""
from __future__ import annotations

import zlib
from collections import namedtuple
from dataclasses import dataclass, fields
from functools import cache
from typing import Callable, Optional

import numpy as np
from numba import njit

from beton.errors import UserError

# What an op does to the image; the kernels branch on this, never on the op.
GEOMETRIC = 0  # composes into the affine map from output to source coordinates (sample only)
COLOUR = 1  # maps each output pixel's (r, g, b) after sampling: `colour`, `colour_torch`
BOX = 2  # fills a rectangle of the output with a constant, after everything else: `box`, `box_torch`
KINDS = {GEOMETRIC: "geometric", COLOUR: "colour", BOX: "box"}

# Draw column 0 of a colour or box op is 1.0 where the op fired on that sample.
ACTIVE = 0
# Codes below this are the seven ops that predate the registry (their draw streams are `position * 16 + code`).
LEGACY_CODES = 16


def code_for(name: str) -> int:
    """A stable op code for a new op, from its config name: it keys the op's draws, so it must not change."""
    return LEGACY_CODES + zlib.crc32(name.encode()) % (2**32 - LEGACY_CODES)


# Fills given by name. "mean": the training split's per-channel mean (0..255, the manifest's), resolved when
# the pipeline is built (`pack(..., mean=)`); "reflect": geometric ops only, OpenCV's BORDER_REFLECT_101.
MEAN, REFLECT = "mean", "reflect"
# How the one sampling pass reads outside the source image (AugTable.border, the kernels' `border`).
BORDER_CONSTANT, BORDER_REFLECT = 0, 1


def fill3(value, name: str, words: tuple = (MEAN,)) -> tuple[float, float, float] | str:
    """A fill: a grey, [r, g, b] on 0..255, or one of `words` (kept as the word, resolved by `pack`)."""
    if isinstance(value, str) and value in words:
        return value
    if isinstance(value, (str, bool)):
        vals = []
    elif isinstance(value, (int, float)):
        vals = [value] * 3
    else:
        try:
            vals = list(value)
        except TypeError:
            vals = []
    if len(vals) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 255
                                 for v in vals):
        named = "".join(f", {w!r}" for w in words[:-1]) + f" or {words[-1]!r}" if words else ""
        raise UserError(f"{name}.fill must be a number or [r, g, b] in 0..255{named}, got {value!r}")
    return tuple(float(v) for v in vals)


def resolve_fill(value, mean) -> tuple[float, float, float]:
    """A fill as three numbers: "mean" -> `mean` (which must then be given), "reflect" -> zeros (unused)."""
    if value == MEAN:
        if mean is None:
            raise UserError("fill 'mean' needs the training mean: build the pipeline from a beton folder's manifest "
                            "(or pass mean= to FusedAugment / DeviceAugment)")
        vals = [float(v) for v in mean]
        if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
            raise UserError(f"the training mean for fill 'mean' must be 3 values on the 0..255 scale, got {mean!r}")
        return tuple(vals)
    if value == REFLECT:
        return (0.0, 0.0, 0.0)
    return value


def prob(p, name: str) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise UserError(f"{name}.p must be a probability in [0, 1], got {p!r}")
    return float(p)


def nonneg(v, name: str, integer: bool = False) -> float:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or v < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise UserError(f"{name} must be {kind}, got {v!r}")
    return v


@cache
def settings_layout(spec: type) -> tuple:
    """Field name -> first column of the packed settings row; an RGB tuple field takes three columns."""
    names, cols, col = [], [], 0
    for f in fields(spec):
        names.append(f.name)
        cols.append(col)
        col += len(f.default) if isinstance(f.default, tuple) else 1
    return namedtuple(f"{spec.__name__}Settings", names)(*cols)


def settings_width(spec: type) -> int:
    """Columns the packed settings of `spec` take."""
    return sum(len(f.default) if isinstance(f.default, tuple) else 1 for f in fields(spec))


def draws(*names: str) -> tuple:
    """Names of the columns of an op's draw row, in order."""
    return namedtuple("Draws", names)(*range(len(names)))


@dataclass(frozen=True)
class Aug:
    """Base spec. Subclasses set `code` (the stable id that keys their draws and dispatch) and `kind`."""

    code = -1
    kind = GEOMETRIC

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def geometric(self) -> bool:
        return self.kind == GEOMETRIC

    def settings(self, width: int | None = None, mean=None) -> np.ndarray:
        """The fields packed by name into one float64 row (`settings_layout`), zero-padded to `width`;
        a fill given by name is packed as its numbers (`resolve_fill`: "mean" -> `mean`)."""
        layout = settings_layout(type(self))
        out = np.zeros(width or settings_width(type(self)), dtype=np.float64)
        for f in fields(self):
            value = getattr(self, f.name)
            col = getattr(layout, f.name)
            if isinstance(value, str) and isinstance(f.default, tuple):
                value = resolve_fill(value, mean)
            if isinstance(value, tuple):
                out[col:col + len(value)] = value
            else:
                out[col] = value
        return out

    def geometric_fill(self) -> tuple[float, float, float] | str | None:
        """The fill this op needs outside the source image: numbers, "mean" or "reflect" (None: it never
        samples outside)."""
        return None

    def out_size(self, size: int) -> int:
        return size


@dataclass(frozen=True)
class Op:
    """One module's op: its spec, the names of its draw columns, and its code for the kernels.

    sample(key, stream, s, size, row, m) -> size, numba: draw with `rng.uniform(key, stream, i)`, write
      the draws to `row` (zeroed), compose a geometric map into the affine `m` (`then`), return the
      output size. `s` is the op's settings row. `key` is the sample's (seed, epoch, index).
    sees_epoch: sample takes two more arguments, `ikey` (`rng.index_key(seed, index)`: the same key in
      every epoch) and `epoch`, for ops whose draws persist across epochs (alt_flip).
    colour(v0, v1, v2, row, s) -> (v0, v1, v2), numba, float32 on 0..255: one pixel, where the op fired.
      (All numba functions are inlined into the kernels, under their flags: fastmath for pixel code.)
    colour_torch(out, rows, s, active): the same on a float32 N x H x W x 3 batch, in place.
    box(row, s) -> (y0, x0, h, w, r, g, b), numba: the rectangle to fill where the op fired.
    box_torch(rows, s) -> (y0, x0, h, w, (r, g, b)): the same for a batch (tensors of N).
    """

    spec: type
    sample: Callable
    draws: tuple
    colour: Optional[Callable] = None
    colour_torch: Optional[Callable] = None
    box: Optional[Callable] = None
    box_torch: Optional[Callable] = None
    sees_epoch: bool = False

    def __post_init__(self):
        needs = {GEOMETRIC: (), COLOUR: ("colour", "colour_torch"), BOX: ("box", "box_torch")}[self.spec.kind]
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise TypeError(f"{self.spec.__name__} is a {KINDS[self.spec.kind]} op and needs {', '.join(missing)}")
        if self.spec.kind != GEOMETRIC and (not self.draws or self.draws[0] != ACTIVE or self.draws._fields[0] != "active"):
            raise TypeError(f"{self.spec.__name__}: the first draw column of a {KINDS[self.spec.kind]} op is 'active'")


@njit(cache=True, inline="always")
def then(m, a, b, c, d, e, f):
    """m := m @ g for 2x3 affine maps (g applied first to output coordinates)."""
    m0, m1, m2, m3, m4, m5 = m[0], m[1], m[2], m[3], m[4], m[5]
    m[0] = m0 * a + m1 * d
    m[1] = m0 * b + m1 * e
    m[2] = m0 * c + m1 * f + m2
    m[3] = m3 * a + m4 * d
    m[4] = m3 * b + m4 * e
    m[5] = m3 * c + m4 * f + m5


@njit(cache=True, inline="always")
def about_centre(m, cx, cy, a, b, d, e, tx, ty):
    """Compose the inverse map in = L (out - centre - t) + centre, with L = [[a, b], [d, e]]."""
    ox = cx - (a * (cx + tx) + b * (cy + ty))
    oy = cy - (d * (cx + tx) + e * (cy + ty))
    then(m, a, b, ox, d, e, oy)
