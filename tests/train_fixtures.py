"""Training runs shared across test modules.

Every `fit` pays for building the model and compiling two FFCV pipelines (seconds on 2 cores) on
top of its epochs, so the one uninterrupted run of the tiny experiment that several modules need
(the learning check, the reference that resumed and rerun runs must match, the run the analysis
reads) is trained once per session here.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


def tiny(betons, **over) -> dict:
    """A fastnet experiment on `betons` that learns the learnable betons in 3 epochs (section__key=value
    overrides)."""
    raw = {
        "name": "tiny",
        "model": {"name": "fastnet"},
        "data": {"beton_dir": str(betons), "batch_size": 100, "workers": 2,
                 "augment": [{"random_crop": {"padding": 2}}, "flip"]},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        "scheduler": {"name": "onecycle", "max_lr": 0.05, "pct_start": 0.25},
        "train": {"epochs": 3, "precision": "bf16", "seed": 1},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        raw[section][field] = value
    return raw


@dataclass(frozen=True)
class TrainedRun:
    run: object  # train.run.RunDir
    history: list

    def copy_to(self, dest: Path) -> Path:
        """A private copy of the run folder, for tests that write into it (analysis, resume)."""
        return Path(shutil.copytree(self.run.path, dest))


@pytest.fixture(scope="session")
def tiny_run(learnable_betons, tmp_path_factory) -> TrainedRun:
    """`fit(tiny(learnable_betons))`, uninterrupted, once per session. Read it; never write into it
    (take `copy_to` first)."""
    from train.config import build_config
    from train.loop import fit
    from train.run import RunDir

    run = RunDir(tmp_path_factory.mktemp("tiny_run") / "run")
    history = fit(build_config(tiny(learnable_betons)), run)
    return TrainedRun(run, history)
