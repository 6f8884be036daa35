"""Where data lives: one root, `$FASTCIFAR_DATA` (default `./data`)."""
from __future__ import annotations

import os
from pathlib import Path

DATASETS = ("cifar10", "cifar100")


def data_root() -> Path:
    return Path(os.environ.get("FASTCIFAR_DATA", "./data"))


def dataset_dir(dataset: str) -> Path:
    """The folder holding `train.beton`, `test.beton` and `manifest.json`."""
    return data_root() / dataset
