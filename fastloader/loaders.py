"""Train and test loaders over the betons, yielding the batch contract of docs/design.md.

A batch is `(images, labels)`: images float N x 3 x H x W, channels_last,
normalised with the manifest's train mean/std, in the compute dtype, on the
training device; labels int64 N on the same device.

Pipeline per split (FFCV's Loader does the reading, threading and prefetch):
raw RGB decode -> [FusedAugment] -> ToTensor -> [ToDevice] -> ToTorchImage
-> [DeviceAugment | Normalise]. Where the device is the CPU, the fused kernel
also normalises (it writes float32 HWC, which is a channels_last tensor as it
stands): one pass instead of two on the same cores. On CUDA, uint8 crosses the
bus (4x fewer bytes) and the GPU normalises.
"""
from __future__ import annotations

import time
from pathlib import Path
from queue import Empty
from typing import Iterator

import numba
import numpy as np
import torch
from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.traversal_order.base import TraversalOrder
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from beton import schema
from beton.errors import UserError
from beton.manifest import check_beton, read_manifest

from . import compiled
from .config import DataConfig
from .device import DeviceAugment, Normalise
from .ops import EpochCell, FusedAugment
from .threads import own_torch_threads

compiled.install()  # FFCV's pipeline functions compiled once per process, not once per loader

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
          "sequential": OrderOption.SEQUENTIAL}


def _wait_for(iterator, batches_left: int, limit: float = 60.0) -> None:
    """Wait until FFCV's loader thread of an epoch left early has ended, so that no numba kernel is still
    running when the caller moves on (a process that exited mid-kernel aborted: "terminate called ...").

    After `close()` the thread finishes the batches its queue has room for, then sees the end when a put
    times out. One case never ends by itself: with every batch of the epoch prepared, it waits, without a
    timeout, to put its end-of-epoch marker into a full queue; taking a batch out lets it finish.
    """
    queue, deadline = iterator.output_queue, time.monotonic() + limit
    while iterator.is_alive() and time.monotonic() < deadline:
        if 0 < batches_left <= queue.qsize():
            try:
                queue.get_nowait()
                batches_left -= 1
            except Empty:
                pass
        iterator.join(0.05)


class CifarLoader:
    """One split's FFCV loader plus the device-side finish; each iteration is one epoch.

    FFCV reuses its output buffers: keep a batch past the next iteration only as
    a copy (`images.clone()`).
    """

    def __init__(self, loader: Loader, cell: EpochCell, finish, split: str, num_samples: int):
        self._loader = loader
        self._cell = cell
        self._finish = finish
        self.split = split
        self.num_samples = num_samples
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def batch_size(self) -> int:
        return self._loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration draws order and augmentations for (resume uses it)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.batches():
            yield images, labels

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like iteration, with the dataset indices (int64, CPU) of each batch's samples."""
        epoch = self.epoch
        self.epoch += 1
        self._cell.epoch = epoch
        self._loader.next_epoch = epoch
        iterator = iter(self._loader)
        own_torch_threads()  # FFCV set torch's thread count to its worker count at the epoch start
        taken = 0
        try:
            for images, labels, indices in iterator:
                taken += 1
                yield self._finish(images, indices, epoch), labels, indices
        finally:
            iterator.close()  # an epoch left early would otherwise keep FFCV's worker thread waiting
            _wait_for(iterator, len(self._loader) - taken)


class ShardedOrder(TraversalOrder):
    """Rank `rank`'s share of each global batch, so K ranks see what one process would.

    One process with global batch B takes permutation P (FFCV's own: numpy
    default_rng(seed + epoch)) in slices of B. Here every rank draws the same P
    and takes its B/K slot of each slice: the ranks' samples are disjoint, cover
    the epoch, and each step's global batch is the single-process one. (FFCV's
    distributed order uses DistributedSampler's permutation instead, so a
    K-process run could not be compared with a one-process run.) The last
    partial global batch is `tail`: "drop"ped, "pad"ded by wrapping around so
    every rank runs the same number of steps (training: DDP needs that), or
    "split" without repeats (evaluation: exact counts, no collective per batch).
    """

    def __init__(self, rank: int, world: int, global_batch: int, shuffle: bool, tail: str):
        self.rank, self.world, self.global_batch = rank, world, global_batch
        self.shuffle, self.tail = shuffle, tail

    def __call__(self, loader: Loader) -> "ShardedOrder":
        # FFCV's Loader accepts a custom order only as an instance, which it then calls with itself
        self.indices = np.asarray(loader.indices)
        self.seed = loader.seed or 0
        self.distributed, self.loader, self.sampler = True, loader, None
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng(self.seed + epoch).permutation(self.indices) if self.shuffle else self.indices
        share = self.global_batch // self.world
        full = len(order) // self.global_batch * self.global_batch
        mine = order[:full].reshape(-1, self.world, share)[:, self.rank].ravel()
        rest = len(order) - full
        if rest and self.tail != "drop":
            per = -(-rest // self.world)
            tail = np.resize(order, full + per * self.world)[full:] if self.tail == "pad" else order[full:]
            mine = np.concatenate([mine, tail[self.rank * per:(self.rank + 1) * per]])
        return mine


def _world() -> tuple[int, int]:
    """(rank, size) of torch.distributed's process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def int_column() -> list:
    """FFCV ops that turn an int field's N x 1 batch into an int64 tensor of N, for every N. A bare `Squeeze()`
    squeezes every dimension of size 1: a final batch of one image became a 0-d tensor, which cross_entropy
    refused on the CPU and FFCV's `ToDevice` (slicing `[:N]` on its loader thread) failed on, so the loop
    waited forever on CUDA. Squeezing only the field's own dimension keeps the batch dimension."""
    return [IntDecoder(), ToTensor(), Squeeze(1)]


def _ffcv_loader(path: Path, batch_size: int, workers: int, order: str, seed: int, indices, drop_last: bool,
                 batches_ahead: int, os_cache: bool, image_ops: list, device: torch.device, train: bool,
                 shard: bool) -> Loader:
    """FFCV's Loader for one split; `batch_size` is global, each rank of a distributed run takes its share
    (unless not `shard`: rank 0's analysis reads the whole split while the process group lives on)."""
    # A blocking copy, on FFCV's loader thread: FFCV (1.0.2) fills a ring of batches_ahead + 2 pinned host
    # buffers and copies each to the GPU on that slot's stream, after a device-side wait for the main stream
    # (loader/epoch_iterator.py:62-68, 127-129; transforms/ops.py:56). Its thread refills a slot as soon as the
    # loop has taken the batch after that slot's (a Queue of batches_ahead, line 43), and nothing makes the host
    # wait for the slot's earlier copy: with non_blocking=True, a loop running more than ~batches_ahead batches
    # ahead of the GPU (it reads results back every 10) could have a batch's pixels rewritten before they reach
    # the GPU. Blocking, the thread finishes each copy before it touches the slot again (the main thread runs on).
    to_device = [ToDevice(device, non_blocking=False)] if device.type == "cuda" else []
    pipelines = {
        schema.IMAGE: [SimpleRGBImageDecoder(), *image_ops, ToTensor(), *to_device,
                       ToTorchImage(channels_last=True, convert_back_int16=False)],
        schema.LABEL: [*int_column(), *to_device],
        schema.INDEX: int_column(),
    }
    rank, world = _world() if shard else (0, 1)
    if world > 1:
        if batch_size % world:
            raise UserError(f"batch size {batch_size} does not divide among {world} processes")
        if order == "quasi_random":
            raise UserError("data.order quasi_random is not available in distributed runs; use random")
        tail = "drop" if drop_last else "pad" if train else "split"
        order = ShardedOrder(rank, world, batch_size, shuffle=order == "random", tail=tail)
        batch_size //= world
    else:
        order = ORDERS[order]
    return _open(path, batch_size=batch_size, num_workers=workers, order=order, seed=seed, indices=indices,
                 pipelines=pipelines, drop_last=drop_last, batches_ahead=batches_ahead, os_cache=os_cache,
                 distributed=world > 1)


def _open(path: Path, num_workers: int, **kwargs) -> Loader:
    """FFCV's Loader, with its assorted errors on a damaged file turned into one line.

    FFCV hands `num_workers` (-1: os.cpu_count()) to numba, which refuses more threads than the process
    may use (`taskset`, a container's CPU limit): the loader then runs on those. Batches do not depend
    on the worker count (augmentations are drawn from (seed, epoch, index)).
    """
    limit = numba.config.NUMBA_NUM_THREADS
    workers = limit if num_workers < 1 else min(num_workers, limit)
    try:
        return Loader(str(path), num_workers=workers, **kwargs)
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from e


def _subset(n: int, limit: int | None):
    return None if limit is None else np.arange(min(limit, n))


VAL_STREAM = 0x56414C  # "VAL": keeps the held-out draw apart from the order's default_rng(seed + epoch)


def train_val_indices(n_total: int, cfg: DataConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(training, validation) dataset indices of train.beton: `data.val_split` images of the training
    images (the first `data.subset`, or all) are held out, drawn from `data.seed` alone, so the split is
    the same on every rank, on resume and between runs of one seed. (None, None) without a split."""
    if not cfg.val_split:
        return _subset(n_total, cfg.subset), None
    pool = np.arange(min(cfg.subset or n_total, n_total))
    if cfg.val_split >= len(pool):
        raise UserError(f"data.val_split {cfg.val_split} leaves no training images (of {len(pool)})")
    drawn = np.random.default_rng([cfg.seed, VAL_STREAM]).permutation(pool)
    return np.sort(drawn[cfg.val_split:]), np.sort(drawn[:cfg.val_split])


def build_loader(cfg: DataConfig, split: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, manifest: dict | None = None, shard: bool = True) -> CifarLoader:
    """The loader of one split: "train" augments (cfg.augment), "test" and "val" (the images
    `data.val_split` holds out of train.beton) only normalise.

    Under torchrun each rank reads its shard; `shard=False` reads the whole split on this rank.
    """
    device = torch.device(device)
    folder = Path(cfg.folder())
    manifest = manifest or read_manifest(folder)
    source = "train" if split == "val" else split
    path = check_beton(folder, manifest, source)
    mean, std = manifest["mean"], manifest["std"]
    train = split == "train"
    augs = cfg.augmentations() if train else []
    n_total = int(manifest["splits"][source]["count"])
    if split == "test":
        indices = _subset(n_total, cfg.test_subset)
    else:
        indices = train_val_indices(n_total, cfg)[0 if train else 1]
        if split == "val" and indices is None:
            raise UserError("there is no validation split: set data.val_split")
    n = n_total if indices is None else len(indices)

    cell = EpochCell()
    on_device = train and cfg.augment_where == "device" and augs
    normalise_in_kernel = device.type == "cpu" and not on_device
    image_ops = []
    if not on_device and (augs or normalise_in_kernel):
        kernel_stats = dict(mean=mean, std=std) if normalise_in_kernel else {}
        image_ops = [FusedAugment(augs, seed=cfg.seed, cell=cell, fill_mean=mean, **kernel_stats)]

    if on_device:
        device_augment = DeviceAugment(augs, cfg.seed, mean, std, dtype)

        def finish(images, indices, epoch):
            return device_augment(images, indices.numpy(), epoch)
    elif normalise_in_kernel:
        def finish(images, indices, epoch):
            return images if dtype == torch.float32 else images.to(dtype)
    else:
        normalise = Normalise(mean, std, dtype)

        def finish(images, indices, epoch):
            return normalise(images)

    batch = cfg.batch_size if train else (cfg.test_batch_size or cfg.batch_size)
    loader = _ffcv_loader(path, batch, cfg.num_workers(),
                          cfg.order if train else "sequential", cfg.seed, indices,
                          cfg.drop_last and train, cfg.batches_ahead, cfg.os_cache, image_ops, device, train,
                          shard)
    own_torch_threads()  # FFCV's Loader set it to the worker count
    return CifarLoader(loader, cell, finish, split, n)


def build_loaders(cfg: DataConfig, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[CifarLoader, CifarLoader]:
    """Train and test loaders for `cfg`, yielding `(images, labels)` on `device` (the validation
    split, if any: `build_loader(cfg, "val", ...)`)."""
    manifest = read_manifest(Path(cfg.folder()))
    return (build_loader(cfg, "train", device, dtype, manifest),
            build_loader(cfg, "test", device, dtype, manifest))


def cycle(loader) -> Iterator:
    """The loader's batches, epoch after epoch. Closing it ends the current epoch early: CifarLoader
    then closes FFCV's iterator, releasing its worker thread and buffers, without reading the rest."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:  # or this would spin forever
            raise UserError("the train loader yields no batches (fewer images than one batch with drop_last?)")


def read_split(folder: str | Path, split: str, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 N x 32 x 32 x 3) and labels of a split, in dataset order."""
    path = Path(folder) / schema.beton_name(split)
    if not path.is_file():
        raise UserError(f"missing {path}; write it with `fastcifar beton write`")
    pipelines = {schema.IMAGE: [SimpleRGBImageDecoder()], schema.LABEL: [IntDecoder()], schema.INDEX: None}
    loader = _open(path, batch_size=1000, num_workers=workers or -1, order=OrderOption.SEQUENTIAL,
                   pipelines=pipelines, drop_last=False)
    images, labels = zip(*((x.copy(), y.reshape(-1).copy()) for x, y in loader))
    return np.concatenate(images), np.concatenate(labels)
