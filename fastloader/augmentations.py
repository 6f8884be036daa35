"""Augmentation specs and their registry: what each augmentation draws and how it maps pixels.

A spec is data (a type code and up to 8 settings) so one numba kernel can run
any list of them in a single pass; `REGISTRY` maps the config name to the spec
class, so adding an augmentation is one class and one line (plus its branch in
`params.py` and, for pixel ops, in the kernels).

Geometric specs (crop, flip, rotate, shift-scale-rotate) compose, in list order,
into one affine map from output to source pixel coordinates; the source is
sampled once, bilinearly, with `fill` outside the source image. Pixel specs
(cutout, grayscale, RGB shift) then act, in list order, on the output image.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from beton.errors import UserError

# Type codes shared with params.py and the kernels.
CROP, FLIP, ROTATE, SSR, CUTOUT, GRAY, RGBSHIFT = range(7)
GEOMETRIC = (CROP, FLIP, ROTATE, SSR)
N_SETTINGS = 8


def _fill3(value, name: str) -> tuple[float, float, float]:
    vals = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(vals) != 3 or not all(isinstance(v, (int, float)) and 0 <= v <= 255 for v in vals):
        raise UserError(f"{name}.fill must be a number or [r, g, b] in 0..255, got {value!r}")
    return tuple(float(v) for v in vals)


def _prob(p, name: str) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise UserError(f"{name}.p must be a probability in [0, 1], got {p!r}")
    return float(p)


def _nonneg(v, name: str, integer: bool = False) -> float:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or v < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise UserError(f"{name} must be {kind}, got {v!r}")
    return v


@dataclass(frozen=True)
class Aug:
    """Base: `code` picks the kernel branch, `settings()` packs the parameters."""

    code = -1

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def geometric(self) -> bool:
        return self.code in GEOMETRIC

    def settings(self) -> np.ndarray:
        raise NotImplementedError

    def geometric_fill(self) -> tuple[float, float, float] | None:
        """The fill this op needs outside the source image (None: it never samples outside)."""
        return None

    def out_size(self, size: int) -> int:
        return size


def _pack(*values) -> np.ndarray:
    out = np.zeros(N_SETTINGS, dtype=np.float64)
    out[: len(values)] = values
    return out


@dataclass(frozen=True)
class RandomCrop(Aug):
    """Pad by `padding` on every side with `fill`, then crop `size` x `size` at a random offset."""

    size: int = 32
    padding: int = 4
    fill: tuple = (0.0, 0.0, 0.0)
    code = CROP

    def __post_init__(self):
        _nonneg(self.size, "RandomCrop.size", integer=True)
        _nonneg(self.padding, "RandomCrop.padding", integer=True)
        if self.size < 1:
            raise UserError(f"RandomCrop.size must be at least 1, got {self.size}")
        object.__setattr__(self, "fill", _fill3(self.fill, "RandomCrop"))

    def settings(self):
        return _pack(self.size, self.padding)

    def geometric_fill(self):
        return self.fill if self.padding > 0 else None

    def out_size(self, size):
        if self.size > size + 2 * self.padding:
            raise UserError(f"RandomCrop.size {self.size} is larger than the padded image ({size} + 2 x {self.padding})")
        return self.size


@dataclass(frozen=True)
class RandomHorizontalFlip(Aug):
    p: float = 0.5
    code = FLIP

    def __post_init__(self):
        _prob(self.p, "RandomHorizontalFlip")

    def settings(self):
        return _pack(self.p)


@dataclass(frozen=True)
class RandomRotate(Aug):
    """Rotate about the image centre by an angle uniform in [-max_degrees, max_degrees] (positive: counter-clockwise)."""

    max_degrees: float = 5.0
    fill: tuple = (0.0, 0.0, 0.0)
    p: float = 1.0
    code = ROTATE

    def __post_init__(self):
        _nonneg(self.max_degrees, "RandomRotate.max_degrees")
        _prob(self.p, "RandomRotate")
        object.__setattr__(self, "fill", _fill3(self.fill, "RandomRotate"))

    def settings(self):
        return _pack(self.max_degrees, self.p)

    def geometric_fill(self):
        return self.fill


@dataclass(frozen=True)
class ShiftScaleRotate(Aug):
    """albumentations' ShiftScaleRotate: shift (fraction of size), scale 1 +- scale_limit, rotate +- rotate_limit."""

    shift_limit: float = 0.0625
    scale_limit: float = 0.1
    rotate_limit: float = 45.0
    fill: tuple = (0.0, 0.0, 0.0)
    p: float = 0.5
    code = SSR

    def __post_init__(self):
        _nonneg(self.shift_limit, "ShiftScaleRotate.shift_limit")
        _nonneg(self.rotate_limit, "ShiftScaleRotate.rotate_limit")
        if not isinstance(self.scale_limit, (int, float)) or not 0 <= self.scale_limit < 1:
            raise UserError(f"ShiftScaleRotate.scale_limit must be in [0, 1), got {self.scale_limit!r}")
        _prob(self.p, "ShiftScaleRotate")
        object.__setattr__(self, "fill", _fill3(self.fill, "ShiftScaleRotate"))

    def settings(self):
        return _pack(self.shift_limit, self.scale_limit, self.rotate_limit, self.p)

    def geometric_fill(self):
        return self.fill


@dataclass(frozen=True)
class Cutout(Aug):
    """Fill a `size` x `size` square, placed uniformly and wholly inside the image, with `fill`."""

    size: int = 16
    fill: tuple = (0.0, 0.0, 0.0)
    p: float = 1.0
    code = CUTOUT

    def __post_init__(self):
        _nonneg(self.size, "Cutout.size", integer=True)
        _prob(self.p, "Cutout")
        object.__setattr__(self, "fill", _fill3(self.fill, "Cutout"))

    def settings(self):
        return _pack(self.size, self.p, *self.fill)

    def out_size(self, size):
        if self.size > size:
            raise UserError(f"Cutout.size {self.size} is larger than the image ({size})")
        return size


@dataclass(frozen=True)
class Grayscale(Aug):
    """Replace RGB by luma (0.299 R + 0.587 G + 0.114 B) with probability p."""

    p: float = 0.2
    code = GRAY

    def __post_init__(self):
        _prob(self.p, "Grayscale")

    def settings(self):
        return _pack(self.p)


@dataclass(frozen=True)
class RGBShift(Aug):
    """Add to each channel a shift uniform in [-limit, limit] (0-255 scale), then clip."""

    r_shift_limit: float = 20.0
    g_shift_limit: float = 20.0
    b_shift_limit: float = 20.0
    p: float = 0.5
    code = RGBSHIFT

    def __post_init__(self):
        for f in ("r_shift_limit", "g_shift_limit", "b_shift_limit"):
            _nonneg(getattr(self, f), f"RGBShift.{f}")
        _prob(self.p, "RGBShift")

    def settings(self):
        return _pack(self.r_shift_limit, self.g_shift_limit, self.b_shift_limit, self.p)


REGISTRY: dict[str, type[Aug]] = {
    "random_crop": RandomCrop,
    "flip": RandomHorizontalFlip,
    "rotate": RandomRotate,
    "shift_scale_rotate": ShiftScaleRotate,
    "cutout": Cutout,
    "grayscale": Grayscale,
    "rgb_shift": RGBShift,
}


def make_aug(entry) -> Aug:
    """One config entry (`{name: {param: value}}`, `{name: null}` or `name`) to a spec."""
    if isinstance(entry, str):
        name, params = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, params = next(iter(entry.items()))
        params = params or {}
    else:
        raise UserError(f"an augmentation must be a name or {{name: {{params}}}}, got {entry!r}")
    if name not in REGISTRY:
        raise UserError(f"unknown augmentation {name!r}; known: {', '.join(REGISTRY)}")
    if not isinstance(params, dict):
        raise UserError(f"parameters of augmentation {name!r} must be a mapping, got {params!r}")
    cls = REGISTRY[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise UserError(f"unknown parameter(s) {', '.join(unknown)} for augmentation {name!r}; known: {', '.join(sorted(known))}")
    return cls(**params)


@dataclass(frozen=True)
class AugTable:
    """A list of specs packed for the kernels, with the output size and geometric fill."""

    codes: np.ndarray  # (K,) int64
    settings: np.ndarray  # (K, N_SETTINGS) float64
    fill: np.ndarray  # (3,) float64, outside-the-source value
    in_size: int
    out_size: int


def pack(augs: Sequence[Aug], in_size: int = 32) -> AugTable:
    fills = {a.geometric_fill() for a in augs if a.geometric_fill() is not None}
    if len(fills) > 1:
        raise UserError("geometric augmentations disagree on fill "
                        f"({', '.join(str(list(f)) for f in sorted(fills))}); give them one fill, since they share one sampling pass")
    size = in_size
    for a in augs:
        size = a.out_size(size)
    codes = np.array([a.code for a in augs], dtype=np.int64)
    settings = np.stack([a.settings() for a in augs]) if augs else np.zeros((0, N_SETTINGS))
    fill = np.array(fills.pop() if fills else (0.0, 0.0, 0.0), dtype=np.float64)
    return AugTable(codes, settings, fill, in_size, size)
