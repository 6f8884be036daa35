"""Counter-based random draws: a pure function of (seed, epoch, index, op, draw).

numba's np.random inside prange is per-thread state that FFCV never seeds, so
draws would depend on which thread handled a sample. Hashing the sample's
coordinates instead makes every draw reproducible whatever the thread count,
and lets the torch path recompute exactly the loader path's parameters.
The mixer is SplitMix64's finaliser (a bijection on 64-bit integers).

Op k of a pipeline draws from stream `stream(k, code)`, a function of its
position and its op's stable code, so two ops of one pipeline (and the same
op in one-op pipelines at different places) draw independently.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=True, inline="always")
def mix64(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def sample_key(seed, epoch, index):
    """One 64-bit key per (seed, epoch, dataset index); draws branch off it."""
    h = mix64(np.uint64(seed) * _GOLDEN + np.uint64(1))
    h = mix64(h ^ (np.uint64(epoch) * _GOLDEN))
    return mix64(h ^ (np.uint64(index) * _GOLDEN + np.uint64(2)))


@njit(cache=True, inline="always")
def index_key(seed, index):
    """One 64-bit key per (seed, dataset index), the same in every epoch (for draws that persist across
    epochs, as alt_flip's coin); built apart from `sample_key`, so it is no epoch's key."""
    h = mix64(np.uint64(seed) * _GOLDEN + np.uint64(3))
    return mix64(h ^ (np.uint64(index) * _GOLDEN + np.uint64(4)))


@njit(cache=True, inline="always")
def uniform(key, op, draw):
    """A float in [0, 1) for draw `draw` of augmentation `op` of a sample."""
    z = mix64(key ^ (np.uint64(op * 64 + draw + 1) * _GOLDEN))
    return np.float64(z >> _S11) * _TO_UNIT


@njit(cache=True, inline="always")
def stream(position, code):
    """The draw stream of the op with stable `code` at `position` in its pipeline.

    The seven ops that predate the registry (codes below 16) keep `position * 16 + code`, so their
    draws, and the pixels of every run made with them, are unchanged. Other codes (32-bit, from the
    op's name) map above 2**40, beyond every small stream, one to one for positions below 2**20.
    """
    if code < 16:
        return position * 16 + code
    return (1 << 40) + position * (1 << 32) + code
