"""`fastcifar bench loader`: images/s of our pipelines against what users run today.

Every pipeline runs in this process on the same cores with the same
augmentations (see baselines.py); each is timed over `batches` batches after
two warm-up batches, so compilation and worker start-up are reported apart.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import psutil
import torch

from beton.manifest import check_beton, read_manifest

from . import baselines
from .config import DataConfig
from .loaders import build_loader, cycle, read_split

# The seeds' full augmentation: crop with padding 4, flip, rotate +-5 degrees, cutout 16.
BENCH_AUGMENT = [{"random_crop": {"size": 32, "padding": 4}}, "flip", {"rotate": {"max_degrees": 5}},
                 {"cutout": {"size": 16}}]
KEYS = ("fastcifar_loader", "fastcifar_device", "fastcifar_test", "torchvision", "albumentations", "ffcv_builtin")
WARMUP = 2


def images_per_second(loader, batches: int) -> float:
    """Steady-state rate: skip WARMUP batches, then time `batches` batches (cycling epochs)."""
    stream = cycle(loader)
    for _ in islice(stream, WARMUP):
        pass
    n = 0
    start = time.perf_counter()
    for batch in islice(stream, batches):
        n += len(batch[0])
    return n / (time.perf_counter() - start)


def first_batch_seconds(loader) -> float:
    start = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - start


def run(folder: str, batches: int = 100, workers: int | None = None, baselines_too: bool = True,
        augment: list | None = None) -> dict:
    """All rates (images/s) plus first-batch seconds and resident memory; `augment` (a `data.augment`
    list) replaces BENCH_AUGMENT in fastcifar's pipelines (the baselines always do BENCH_AUGMENT's work)."""
    workers = workers or len(os.sched_getaffinity(0))
    manifest = read_manifest(folder)
    for split in ("train", "test"):  # both, before a minute of compiling and timing the first
        check_beton(folder, manifest, split)
    cfg = DataConfig(beton_dir=folder, augment=BENCH_AUGMENT if augment is None else augment, workers=workers)
    results: dict = {}
    train = build_loader(cfg, "train", "cpu", manifest=manifest)
    results["first_batch_s"] = first_batch_seconds(train)
    results["fastcifar_loader"] = images_per_second(train, batches)
    test = build_loader(cfg, "test", "cpu", manifest=manifest)
    results["fastcifar_test"] = images_per_second(test, batches)
    results["rss_mb_both_loaders"] = psutil.Process().memory_info().rss / 2**20
    device = build_loader(replace(cfg, augment_where="device"), "train", "cpu", manifest=manifest)
    results["fastcifar_device"] = images_per_second(device, max(batches // 5, 5))
    del train, test, device
    if baselines_too:
        mean, std = manifest["mean"], manifest["std"]
        images, labels = read_split(folder, "train", workers)
        for key, make in (("torchvision", baselines.torchvision_loader),
                          ("albumentations", baselines.albumentations_loader)):
            results[key] = images_per_second(make(images, labels, mean, std, workers), max(batches // 5, 5))
        results["ffcv_builtin"] = images_per_second(baselines.ffcv_builtin_loader(Path(folder) / "train.beton", workers),
                                                    batches)
    results["workers"] = workers
    results["torch_threads"] = torch.get_num_threads()
    return results
