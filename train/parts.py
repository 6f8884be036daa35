"""What a run is made of, built from its config: device, precision, model and loaders (`RunParts`).

`build` is shared by training, the LR range test and the benchmarks, so all three train the
same model on the same batches. A model that needs the data says so with a `fit_to_data` hook
(the contract: `train.models`), which `build` calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol, runtime_checkable

import torch

from beton.manifest import read_manifest
from fastloader.loaders import build_loader, build_loaders

from . import distributed
from .config import ExperimentConfig
from .hardware import Precision, resolve_device, resolve_precision, reuse_freed_memory, set_deterministic
from .models import create_model, module_hooks
from .precision import auto_precision


@runtime_checkable
class BatchLoader(Protocol):
    """What the loop needs of a loader: one epoch of (images, labels) batches per iteration."""

    num_samples: int  # images per epoch on this rank (before drop_last)

    def __len__(self) -> int:  # batches per epoch
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ...

    def set_epoch(self, epoch: int) -> None:  # the epoch the next iteration draws order and augmentations for
        ...


@dataclass
class RunParts:
    """Everything a run needs, built from its config (shared by train, lr-find and bench)."""

    cfg: ExperimentConfig
    device: torch.device
    precision: Precision
    model: torch.nn.Module
    train_loader: BatchLoader
    test_loader: BatchLoader
    classes: list
    world: distributed.World = field(default_factory=distributed.World)
    notes: list = field(default_factory=list)  # what was resolved at build time, for the run's log
    startup: dict = field(default_factory=dict)  # seconds of each named start-up phase (loop.startup_line)
    lr_find: dict | None = None  # the LR range test `max_lr: find` ran (lr_find.json/png in the run folder)
    val_loader: BatchLoader | None = None  # the images data.val_split holds out of the training split


def build(cfg: ExperimentConfig, device: torch.device | None = None) -> RunParts:
    """The run's parts; `precision: auto` is resolved here (by measurement on the CPU) and `cfg` updated,
    so the run's config.yaml holds the precision it ran in."""
    device = device or resolve_device(cfg.train.device)
    set_deterministic(cfg.train.deterministic)  # before any CUDA work of the run
    if device.type == "cpu" and cfg.train.reuse_memory:
        reuse_freed_memory()  # before the precision probe, so it times the steps the run will take
    startup, begin = {}, time.perf_counter()
    manifest = read_manifest(cfg.data.folder())
    classes = list(manifest["classes"])
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = create_model(cfg.model, num_classes=len(classes))
    for fit_to_data in module_hooks(model, "fit_to_data"):  # e.g. airnet's whitening conv, set from the images
        fit_to_data(cfg.data, manifest["mean"], manifest["std"])
    if cfg.model.sync_bn:
        model = distributed.sync_batchnorm(model, device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    startup["model"], begin = time.perf_counter() - begin, time.perf_counter()
    notes = []
    if cfg.train.precision == "auto":  # measured on rank 0, used by all
        world = distributed.current()
        name, note = distributed.from_main(auto_precision(cfg, model, device, len(classes))
                                           if world.main else None, device)
        cfg = replace(cfg, train=replace(cfg.train, precision=name))
        notes.append(note)
        startup["precision probe"], begin = time.perf_counter() - begin, time.perf_counter()
    precision = resolve_precision(cfg.train.precision, device)
    train_loader, test_loader = build_loaders(cfg.data, device, precision.batch_dtype)
    val_loader = build_loader(cfg.data, "val", device, precision.batch_dtype) if cfg.data.val_split else None
    startup["loaders"] = time.perf_counter() - begin
    return RunParts(cfg=cfg, device=device, precision=precision, model=model, train_loader=train_loader,
                    test_loader=test_loader, classes=classes, world=distributed.current(), notes=notes,
                    val_loader=val_loader, startup=startup)
