"""A run's optimizer and LR schedule, rebuilt from its saved config.yaml (which holds the resolved values:
`max_lr: find`, `precision: auto` and `train.budget` are numbers there).

The schedule is a function of the config and the step (ReduceLROnPlateau also of the recorded test
metrics), so the LR of every optimizer step is replayed here rather than stored by training: the
run's optimizer is built the way training builds it (over a parameter-free copy of the model on
torch's meta device, or the run's loaded model) and its schedule stepped batch by batch. The replay
is kept only where it agrees with the LR every recorded epoch started with (metrics.jsonl's `lr`,
the first parameter group's).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from beton.errors import UserError
from beton.manifest import read_manifest
from fastloader.loaders import train_val_indices
from train.config import ExperimentConfig
from train.models import create_model
from train.optim import build_optimizer, build_schedule

DEFAULT_CLASSES = 10  # the stand-in model's head when the beton's manifest cannot be read (the LRs do not depend on it)


def steps_per_epoch(cfg: ExperimentConfig, train_count: int) -> int:
    """Optimizer steps in one epoch over `train_count` training images (before data.subset and data.val_split)."""
    indices, _ = train_val_indices(train_count, cfg.data)
    n = train_count if indices is None else len(indices)
    batch = cfg.data.batch_size
    return n // batch if cfg.data.drop_last else math.ceil(n / batch)


def train_count(cfg: ExperimentConfig) -> int | None:
    """Images in the run's train.beton (its manifest's count), or None where the manifest cannot be read."""
    try:
        return int(read_manifest(cfg.data.folder())["splits"]["train"]["count"])
    except (UserError, KeyError, TypeError, ValueError):  # a run folder copied without its betons: no replay
        return None


def stand_in_optimizer(cfg: ExperimentConfig, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """The run's optimizer as training builds it (one param group per role for `optimizer.name: roles`), over
    `model` or a copy of the config's model on the meta device (no memory, no weights). Never stepped."""
    if model is None:
        with torch.device("meta"):  # pretrained weights would be thrown away: not loaded
            model = create_model(cfg.model, num_classes=cfg.model.num_classes or DEFAULT_CLASSES, pretrained=False)
    return build_optimizer(model, cfg.optimizer)


@dataclass
class LRTrace:
    """The LR of every optimizer step: step s of the run is at x[s] = s / steps_per_epoch epochs (epoch e's
    steps from e - 1 to e), with one LR array per parameter role (one entry, "lr", without roles)."""

    x: np.ndarray
    lr: dict[str, np.ndarray]
    steps_per_epoch: int

    @property
    def first(self) -> np.ndarray:
        """The first parameter group's LRs: the ones metrics.jsonl records."""
        return next(iter(self.lr.values()))


def replay_lr(cfg: ExperimentConfig, metrics: list[dict], steps: int | None,
              model: torch.nn.Module | None = None) -> LRTrace | None:
    """The LR of every step of the recorded epochs, or None where it cannot be rebuilt or disagrees with
    the recorded epoch LRs."""
    if not metrics or not steps or steps < 1:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns when a schedule steps before its optimizer
            optimizer = stand_in_optimizer(cfg, model)
            schedule = build_schedule(optimizer, cfg.scheduler, cfg.train.epochs, steps, cfg.optimizer.lr)
            groups = optimizer.param_groups if cfg.optimizer.name == "roles" else optimizer.param_groups[:1]
            labels = [g["role"] if cfg.optimizer.name == "roles" else "lr" for g in groups]
            lrs: list[list[float]] = [[] for _ in groups]
            for epoch, m in enumerate(metrics):
                if not math.isclose(schedule.lr, float(m["lr"]), rel_tol=1e-6, abs_tol=1e-12):
                    return None
                for _ in range(cfg.train.epoch_batches(epoch, steps)):  # a fractional last epoch: its part
                    for trace, group in zip(lrs, groups):
                        trace.append(float(group["lr"]))
                    schedule.after_batch()
                schedule.after_epoch({k: float(v) for k, v in m.items() if k.endswith(("_loss", "_acc"))})
    except Exception:  # a config this replay cannot rebuild (a model that cannot be built on the meta device)
        return None
    x = np.arange(len(lrs[0])) / steps
    return LRTrace(x, {label: np.asarray(trace) for label, trace in zip(labels, lrs)}, steps)
