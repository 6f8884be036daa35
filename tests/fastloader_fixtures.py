"""Synthetic betons and shared compiled loaders for the fastloader tests.

Building an FFCV loader compiles its pipeline (seconds on 2 cores), so the
loaders are built once per session and shared; each test iterates them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from beton.sources import Source, Split
from beton.writer import write_betons

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-batches-py"
N_TRAIN, N_TEST = 700, 300
CLASSES = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"]


def synthetic_images(n: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: structure for rotation checks, variety for statistics."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    base = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.float64)
    noise = rng.integers(0, 40, size=(n, 32, 32, 3))
    shift = rng.integers(0, 60, size=(n, 1, 1, 3))
    return np.clip(base[None] + noise + shift, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def synthetic_source() -> Source:
    rng = np.random.default_rng(1)
    splits = {
        "train": Split(synthetic_images(N_TRAIN, 2), rng.integers(0, 10, N_TRAIN).astype(np.int64)),
        "test": Split(synthetic_images(N_TEST, 3), rng.integers(0, 10, N_TEST).astype(np.int64)),
    }
    return Source("cifar10", CLASSES, splits, "synthetic")


@pytest.fixture(scope="session")
def beton_dir(tmp_path_factory, synthetic_source) -> Path:
    out = tmp_path_factory.mktemp("betons") / "cifar10"
    write_betons(synthetic_source, out)
    return out


@pytest.fixture(scope="session")
def loaders(beton_dir):
    """(train, test) with the bench augmentation, 2 workers, batch 128, built once."""
    from fastloader.bench import BENCH_AUGMENT
    from fastloader.config import DataConfig
    from fastloader.loaders import build_loaders

    cfg = DataConfig(beton_dir=str(beton_dir), augment=BENCH_AUGMENT, batch_size=128, workers=2, seed=7)
    return build_loaders(cfg, "cpu")


@pytest.fixture(scope="session")
def real_cifar10() -> Path:
    if not (REAL_CIFAR10 / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 not found at {REAL_CIFAR10}")
    return REAL_CIFAR10


def learnable_source(n_train: int = 1000, n_test: int = 200, seed: int = 4) -> Source:
    """Ten classes a small net separates in a few epochs: each class has its own colour and stripe."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 225, size=(10, 3))
    yy, xx = np.mgrid[0:32, 0:32]

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.int64)
        stripe = ((xx[None] + yy[None] * labels[:, None, None]) // 4 % 2)[..., None] * 40
        noise = rng.integers(-25, 25, size=(n, 32, 32, 3))
        images = np.clip(colours[labels][:, None, None, :] + stripe + noise, 0, 255).astype(np.uint8)
        return Split(images, labels)

    return Source("cifar10", CLASSES, {"train": split(n_train), "test": split(n_test)}, "synthetic-learnable")


@pytest.fixture(scope="session")
def learnable_betons(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learnable") / "cifar10"
    write_betons(learnable_source(), out)
    return out


def _compile_kernel(out_dtype) -> None:
    from fastloader.augs import make_aug, pack
    from fastloader.kernel import augment_batch, frozen
    from fastloader.params import draw_params

    table = pack([make_aug("flip")])
    images = np.zeros((2, 32, 32, 3), np.uint8)
    augment_batch(images, np.empty(images.shape, out_dtype), np.arange(2), table.codes, table.settings,
                  table.in_size, 0, 0, table.fill, *frozen(np.ones(3), np.zeros(3)), table.border)
    draw_params(table, 0, 0, np.arange(2))


@pytest.fixture(scope="session", autouse=True)
def compiled_kernel(tmp_path_factory):
    """The fused kernel's two signatures (uint8 and float32 output) in numba's cache before any test needs
    them. Cold, each takes 25-55 s to compile on 2 cores, and every pytest-xdist worker would compile both:
    here each worker starts with a different one, under a lock the others wait on, then finds the rest in
    the cache (a warm cache: about a second)."""
    import fcntl
    import os

    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this run
    order = [np.uint8, np.float32]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    if worker.startswith("gw") and int(worker[2:]) % 2:
        order.reverse()
    for dtype in order:
        with open(shared / f"fastcifar-kernel-{np.dtype(dtype).name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _compile_kernel(dtype)
