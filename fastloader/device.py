"""The same augmentations as batched torch ops, for augmenting on the training device.

Parameters come from `params.draw_params` (the kernel's own function), so
for the same (seed, epoch, indices) this path and the loader path produce the
same pixels: exact for integer maps, within float rounding for rotations.
The arithmetic mirrors the kernel (float32 coordinates, v * scale + offset,
the same fill or BORDER_REFLECT_101 mirror outside the source);
colour and box ops run their modules' torch halves (`colour_torch`, `box_torch`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .augs import BY_CODE, AugTable, pack
from .augs.base import ACTIVE, BORDER_REFLECT, BOX, COLOUR
from .params import draw_params


class Normalise:
    """uint8 NCHW (any memory format) -> normalised `dtype` channels_last, on the input's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32):
        std = torch.as_tensor(std, dtype=torch.float64)
        self.scale = (1.0 / std).float().view(1, 3, 1, 1)
        self.offset = (-torch.as_tensor(mean, dtype=torch.float64) / std).float().view(1, 3, 1, 1)
        self.dtype = dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale.device != images.device:  # once, not a host-to-device copy per batch
            self.scale, self.offset = self.scale.to(images.device), self.offset.to(images.device)
        out = torch.addcmul(self.offset, images.float(), self.scale).contiguous(memory_format=torch.channels_last)
        return out if self.dtype == torch.float32 else out.to(self.dtype)


class DeviceAugment:
    """Augment + normalise a uint8 NCHW batch on its device, keyed by dataset indices."""

    def __init__(self, augs, seed: int, mean, std, dtype: torch.dtype = torch.float32, in_size: int = 32):
        self.table: AugTable = pack(augs, in_size, mean=mean)
        self.seed = int(seed)
        self.normalise = Normalise(mean, std, dtype)

    def __call__(self, images: torch.Tensor, indices, epoch: int) -> torch.Tensor:
        params = draw_params(self.table, self.seed, epoch, np.asarray(indices))
        out = warp(images, params, self.table)  # N x H x W x 3 float32, 0..255
        return self.normalise(out.permute(0, 3, 1, 2))


def reflect101(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside [0, n) read as OpenCV's BORDER_REFLECT_101 (-1 -> 1, n -> n - 2), as kernel.reflect101."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i >= n, period - i, i)


def warp(images: torch.Tensor, params: np.ndarray, table: AugTable) -> torch.Tensor:
    """Geometric map (bilinear; outside the source the fill or, BORDER_REFLECT, its mirror), colour ops,
    then cutout; float32 NHWC on 0..255."""
    dev = images.device
    n, _, h, w = images.shape
    size = table.out_size
    src = images.permute(0, 2, 3, 1).reshape(n, h * w, 3).float()
    fill = torch.tensor(table.fill.tolist(), dtype=torch.float32, device=dev)  # the table is read-only
    p = torch.as_tensor(params, dtype=torch.float32, device=dev)
    m = p[:, 0]
    ys, xs = torch.meshgrid(torch.arange(size, device=dev, dtype=torch.float32),
                            torch.arange(size, device=dev, dtype=torch.float32), indexing="ij")
    coef = [m[:, i].view(n, 1, 1) for i in range(6)]
    sx = coef[0] * xs + (coef[1] * ys + coef[2])
    sy = coef[3] * xs + (coef[4] * ys + coef[5])
    x0, y0 = torch.floor(sx), torch.floor(sy)
    fx, fy = (sx - x0).unsqueeze(-1), (sy - y0).unsqueeze(-1)
    x0, y0 = x0.long(), y0.long()
    out = torch.zeros(n, size, size, 3, device=dev)
    for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        jy, jx = y0 + dy, x0 + dx
        if table.border == BORDER_REFLECT:
            flat = (reflect101(jy, h) * w + reflect101(jx, w)).view(n, -1, 1).expand(-1, -1, 3)
            out += wt * torch.gather(src, 1, flat).view(n, size, size, 3)
            continue
        inside = ((jy >= 0) & (jy < h) & (jx >= 0) & (jx < w)).unsqueeze(-1)
        flat = (jy.clamp(0, h - 1) * w + jx.clamp(0, w - 1)).view(n, -1, 1).expand(-1, -1, 3)
        tap = torch.gather(src, 1, flat).view(n, size, size, 3)
        out += wt * torch.where(inside, tap, fill)
    _colour_ops(out, p, table)
    _cutouts(out, p, table, ys, xs)
    return out


def _colour_ops(out: torch.Tensor, p: torch.Tensor, table: AugTable) -> None:
    for k, code in enumerate(table.codes):
        op = BY_CODE[int(code)]
        if op.spec.kind == COLOUR:
            active = p[:, k + 1, ACTIVE].view(-1, 1, 1, 1) != 0
            op.colour_torch(out, p[:, k + 1], table.settings[k], active)


def _cutouts(out: torch.Tensor, p: torch.Tensor, table: AugTable, ys: torch.Tensor, xs: torch.Tensor) -> None:
    """Box ops, in list order, after everything else."""
    for k, code in enumerate(table.codes):
        op = BY_CODE[int(code)]
        if op.spec.kind != BOX:
            continue
        y0, x0, h, w, fill = op.box_torch(p[:, k + 1], table.settings[k])
        y0, x0 = y0.view(-1, 1, 1), x0.view(-1, 1, 1)
        box = (p[:, k + 1, ACTIVE].view(-1, 1, 1) != 0) & (ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w)
        out[box] = torch.as_tensor(np.array(fill, dtype=np.float32), device=out.device)  # a copy: settings are read-only
