"""Per-sample augmentation parameters, drawn from (seed, epoch, dataset index).

Both augmentation paths call `sample_params`: the numba kernel per sample
inside its prange, the torch path through `draw_params` for a whole batch.
Same inputs, same parameters, so the two paths give the same pixels.

Row 0 of a sample's parameters is the composed affine map from output pixel
coordinates (x, y) to source coordinates: (a, b, c, d, e, f) with
sx = a x + b y + c, sy = d x + e y + f (pixel centres at integers).
Row 1 + k holds what op k drew (its module's `draws` name the columns).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .augs import N_COLS, AugTable
from .augs.dispatch import SALT, sample_op
from .rng import index_key, sample_key, stream


@njit
def sample_params(codes, settings, in_size, seed, epoch, index, out):
    """Fill `out` (K + 1 rows of N_COLS) for one sample; returns the output size."""
    key = sample_key(seed, epoch, index)
    ikey = index_key(seed, index)  # for ops that see the epoch (Op.sees_epoch)
    m = out[0]
    m[:] = 0.0
    m[0] = 1.0
    m[4] = 1.0
    size = float(in_size)
    for j in range(codes.shape[0]):
        row = out[j + 1]
        row[:] = 0.0
        size = sample_op(codes[j], key, stream(j, codes[j]), settings[j], size, row, m, ikey, epoch)
    return size


def _compile(salt):
    """The cached entry point, with `salt` (dispatch.SALT) in numba's cache key."""
    @njit(cache=True, parallel=True)
    def draw_all(codes, settings, in_size, seed, epoch, indices, out):
        salt  # noqa: B018 (a closure value: see dispatch.SALT)
        for i in prange(indices.shape[0]):
            sample_params(codes, settings, in_size, seed, epoch, indices[i], out[i])
    return draw_all


_draw_params = _compile(SALT)


def draw_params(table: AugTable, seed: int, epoch: int, indices) -> np.ndarray:
    """Parameters of a batch: (N, K + 1, N_COLS) float64, the same the kernel draws."""
    indices = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))
    out = np.empty((indices.shape[0], table.codes.shape[0] + 1, N_COLS), dtype=np.float64)
    _draw_params(table.codes, table.settings, table.in_size, np.int64(seed), np.int64(epoch), indices, out)
    return out
