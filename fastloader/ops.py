"""FFCV `Operation`s running the fused kernel on the loader thread.

`FusedAugment` takes any list of augmentation specs and is the fast path; the
named ops (`RandomCrop`, `Cutout`, ..., one per registered spec, made here
from the registry) are the same operation with a one-element list, for FFCV
users composing their own pipelines. Draws are keyed by each op's code, so
separate named ops draw independently.

The op runs in one of FFCV's Python stages (`jit_mode=False`), not a compiled
one: its code is one call of the kernel, which numba caches on disk
(`kernel.augment_batch`, compiled once per machine, releasing the GIL while it
runs). A compiled stage would compile a new wrapper around that kernel for
every loader, and linking the kernel into it cost 0.65 s per loader (2-core
Xeon): a sweep, a test suite or a budget probe builds many loaders. The epoch
lives in an `EpochCell` the loader sets before each epoch starts.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from . import augs as A
from .kernel import augment_batch, frozen


class EpochCell:
    """The epoch number the pipeline reads at every batch (the loader sets it before each epoch)."""

    def __init__(self, epoch: int = 0):
        self.epoch = int(epoch)


class FusedAugment(Operation):
    """All augmentations of a pipeline in one numba pass over each HWC uint8 image.

    Output is uint8 HWC (`mean`/`std` None) or, when `mean` and `std` are given,
    float32 HWC already normalised, which becomes a channels_last tensor with
    no further copy. `fill_mean` (default: `mean`) is the training mean on the
    0..255 scale that `fill: mean` stands for; uint8 output needs it given apart.
    """

    def __init__(self, augs: Sequence[A.Aug], seed: int = 0, cell: EpochCell | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 fill_mean: Sequence[float] | None = None):
        super().__init__()
        self.augs = list(augs)
        self.seed = int(seed)
        self.cell = cell if cell is not None else EpochCell()
        self.fill_mean = fill_mean if fill_mean is not None else mean
        self.normalise = mean is not None
        if self.normalise:
            std = np.asarray(std, dtype=np.float64)
            self.scale, self.offset = frozen(1.0 / std, -np.asarray(mean, dtype=np.float64) / std)
        else:
            self.scale, self.offset = frozen(np.ones(3), np.full(3, 0.5))

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        h, w, c = previous_state.shape
        if h != w or c != 3:
            raise ValueError(f"FusedAugment needs square RGB images, got {previous_state.shape}")
        self.table = A.pack(self.augs, in_size=h, mean=self.fill_mean)
        size = self.table.out_size
        dtype = np.dtype(np.float32 if self.normalise else np.uint8)
        shape = (size, size, 3)
        return replace(previous_state, jit_mode=False, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    def generate_code(self) -> Callable:
        t = self.table
        # numpy scalars: the kernel's one cached signature (a Python int is another type, compiled again)
        codes, settings, in_size, fill, border = t.codes, t.settings, np.int64(t.in_size), t.fill, np.int64(t.border)
        seed, cell, scale, offset = np.int64(self.seed), self.cell, self.scale, self.offset

        def fused_augment(images, dst, indices):
            return augment_batch(images, dst, indices.astype(np.int64), codes, settings, in_size, seed,
                                 np.int64(cell.epoch), fill, scale, offset, border)  # int64 indices: one signature

        fused_augment.with_indices = True
        return fused_augment


def _named(spec: type[A.Aug]) -> Callable[..., FusedAugment]:
    def named(*args, seed: int = 0, cell: EpochCell | None = None, mean=None, std=None, fill_mean=None,
              **params) -> FusedAugment:
        return FusedAugment([spec(*args, **params)], seed=seed, cell=cell, mean=mean, std=std, fill_mean=fill_mean)

    named.__name__ = named.__qualname__ = spec.__name__
    named.__doc__ = f"A FusedAugment of one {spec.__name__}: {spec.__doc__ or ''}"
    return named


globals().update({spec.__name__: _named(spec) for spec in A.REGISTRY.values()})
