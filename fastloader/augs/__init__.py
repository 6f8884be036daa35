"""The augmentation registry: config name -> op module, and the packer that turns specs into kernel input.

An op is one module of this package named after its config key (see
`base.py` for what it holds); adding one is that file plus its name in
`MODULES`. The packer, the numba kernel, the draw streams and the torch
path all read the op from here, so none of them changes.

Geometric ops (crop, flips, rotate, shift-scale-rotate) compose, in list
order, into one affine map from output to source pixel coordinates; the
source is sampled once, bilinearly, with `fill` outside the source image.
Colour ops (grayscale, RGB shift) then act, in list order, on each output
pixel, and box ops (cutout) are written last.

Fills. The geometric ops share one fill, since they share the one sampling
pass: a grey, [r, g, b] (0..255), "mean" (the training split's per-channel
mean, 0..255, from the manifest: `pack(..., mean=)`, which FusedAugment and
DeviceAugment call with the numbers the loader passes them) or "reflect":
OpenCV's BORDER_REFLECT_101 (albumentations' default border, `dcba|abcd|dcba`:
index -1 reads 1, index w reads w - 2), applied to each tap's source index.
A crop with reflect padding is then exactly albumentations' PadIfNeeded
(BORDER_REFLECT_101) followed by the crop, and without rotation still an
integer copy. Cutout takes a number, [r, g, b] or "mean".

The one known difference from applying the ops one by one: a rotated (or
scaled) crop's corners read the source beyond the crop, i.e. the
reflect-padded 40x40 image (or, with a constant fill, the pixels the crop
dropped and the padding's fill), whereas albumentations' Pad -> Crop -> Rotate
mirrors the 32x32 crop itself (or fills its corners). We keep the single warp
(one read of the source; the corners show real neighbouring content); it
equals one cv2.warpAffine of the source with the composed map and
BORDER_REFLECT_101, and matches the sequential pipeline wherever the turn
stays inside the crop (tests/test_border_modes.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import import_module
from typing import Sequence

import numpy as np

from beton.errors import UserError

from .base import (
    BORDER_CONSTANT,
    BORDER_REFLECT,
    BOX,
    COLOUR,
    GEOMETRIC,
    MEAN,
    REFLECT,
    Aug,
    Op,
    resolve_fill,
    settings_layout,
    settings_width,
)

MODULES = (
    "random_crop",
    "flip",
    "rotate",
    "shift_scale_rotate",
    "cutout",
    "grayscale",
    "rgb_shift",
    "vflip",
    "alt_flip",
    "brightness_contrast",
)

OPS: dict[str, Op] = {name: import_module(f"{__name__}.{name}").OP for name in MODULES}
REGISTRY: dict[str, type[Aug]] = {name: op.spec for name, op in OPS.items()}
BY_CODE: dict[int, Op] = {op.spec.code: op for op in OPS.values()}
if len(BY_CODE) != len(OPS):
    raise ImportError(f"two augmentations share a code: {sorted((op.spec.code, n) for n, op in OPS.items())}")

# Columns of a packed settings row, and of a draw row (row 0 of a sample's draws is the 2x3 affine map).
N_SETTINGS = max(settings_width(spec) for spec in REGISTRY.values())
N_COLS = max(6, *(len(op.draws) for op in OPS.values()))

globals().update({spec.__name__: spec for spec in REGISTRY.values()})
__all__ = ["MODULES", "OPS", "REGISTRY", "BY_CODE", "N_SETTINGS", "N_COLS", "Aug", "Op", "AugTable", "make_aug",
           "pack", "settings_layout", "GEOMETRIC", "COLOUR", "BOX", "MEAN", "REFLECT", "BORDER_CONSTANT",
           "BORDER_REFLECT", *(spec.__name__ for spec in REGISTRY.values())]


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

    codes: np.ndarray  # (K,) int64, each op's `code`
    settings: np.ndarray  # (K, N_SETTINGS) float64, each op's fields by `settings_layout` (fills as numbers)
    fill: np.ndarray  # (3,) float64, outside-the-source value (BORDER_CONSTANT)
    in_size: int
    out_size: int
    border: int = BORDER_CONSTANT  # or BORDER_REFLECT: outside the source, read its BORDER_REFLECT_101 mirror


def _shown(fill) -> str:
    return repr(fill) if isinstance(fill, str) else str(list(fill))


def pack(augs: Sequence[Aug], in_size: int = 32, mean: Sequence[float] | None = None) -> AugTable:
    """Pack specs for the kernels; `mean` (the manifest's training mean, 0..255) resolves `fill: mean`."""
    fills = {a.geometric_fill() for a in augs if a.geometric_fill() is not None}
    if len(fills) > 1:
        raise UserError("geometric augmentations disagree on fill "
                        f"({', '.join(sorted(map(_shown, fills)))}); give them one fill, since they share one sampling pass")
    for a in augs:
        if BY_CODE.get(a.code) is None or BY_CODE[a.code].spec is not type(a):
            raise TypeError(f"{type(a).__name__} is not a registered augmentation (see fastloader.augs.MODULES)")
    size = in_size
    for a in augs:
        size = a.out_size(size)
    codes = np.array([a.code for a in augs], dtype=np.int64)
    settings = np.stack([a.settings(N_SETTINGS, mean) for a in augs]) if augs else np.zeros((0, N_SETTINGS))
    geometric = fills.pop() if fills else (0.0, 0.0, 0.0)
    fill = np.array(resolve_fill(geometric, mean), dtype=np.float64)
    border = BORDER_REFLECT if geometric == REFLECT else BORDER_CONSTANT
    for a in (codes, settings, fill):  # read-only, as FFCV's pipeline holds them: one compiled kernel signature
        a.setflags(write=False)
    return AugTable(codes, settings, fill, int(in_size), int(size), border)
