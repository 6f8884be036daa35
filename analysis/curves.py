"""curves.png: train/test loss, train/test accuracy and the LR schedule, per epoch (three panels).

The metrics hold one LR per epoch (the LR its first batch used). Per-batch schedules (OneCycle,
cosine) are redrawn batch by batch by replaying the run's schedule on a stand-in optimizer,
feeding ReduceLROnPlateau the recorded test losses; the replay is kept only where it agrees with
every recorded epoch LR, else the recorded points are drawn alone.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from train.config import ExperimentConfig
from train.optim import build_optimizer, build_schedule

from . import plots


def steps_per_epoch(cfg: ExperimentConfig, train_count: int) -> int:
    n = train_count if cfg.data.subset is None else min(cfg.data.subset, train_count)
    batch = cfg.data.batch_size
    return n // batch if cfg.data.drop_last else math.ceil(n / batch)


def replay_lr(cfg: ExperimentConfig, metrics: list[dict], steps: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(x in epochs, LR) per batch for the recorded epochs, or None where the replay does not match."""
    if not metrics or steps < 1:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stand_in = torch.nn.Linear(1, 1)
            optimizer = build_optimizer(stand_in, cfg.optimizer)
            schedule = build_schedule(optimizer, cfg.scheduler, cfg.train.epochs, steps, cfg.optimizer.lr)
            xs, lrs = [], []
            for e, m in enumerate(metrics):
                if not math.isclose(schedule.lr, float(m["lr"]), rel_tol=1e-6, abs_tol=1e-12):
                    return None
                for b in range(steps):
                    xs.append(e + b / steps)
                    lrs.append(schedule.lr)
                    optimizer.step()
                    schedule.after_batch()
                schedule.after_epoch({k: float(v) for k, v in m.items() if k.endswith(("_loss", "_acc"))})
    except Exception:  # a config this replay cannot rebuild: the recorded points are enough
        return None
    return np.asarray(xs), np.asarray(lrs)


def plot_curves(metrics: list[dict], path: str | Path, lr_trace=None, title: str = "") -> Path:
    """Three panels: loss, accuracy (train, test and val where split, per epoch), LR (per batch where replayed)."""
    plt = plots.plt
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.6))
    if not metrics:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=ax.transAxes)
    else:
        epochs = [m["epoch"] for m in metrics]
        style = dict(marker="o", markersize=3 if len(epochs) > 30 else 4)
        ax_loss.plot(epochs, [m["train_loss"] for m in metrics], label="train", **style)
        ax_loss.plot(epochs, [m["test_loss"] for m in metrics], label="test", **style)
        ax_acc.plot(epochs, [m["train_acc"] for m in metrics], label="train", **style)
        ax_acc.plot(epochs, [m["test_acc"] for m in metrics], label="test", **style)
        if all("val_acc" in m for m in metrics):  # a validation split
            ax_loss.plot(epochs, [m["val_loss"] for m in metrics], label="val", **style)
            ax_acc.plot(epochs, [m["val_acc"] for m in metrics], label="val", **style)
        starts = [e - 1 for e in epochs]  # the recorded LR is the one the epoch started with
        if lr_trace is not None:
            ax_lr.plot(lr_trace[0], lr_trace[1], label="per batch", linewidth=1.5)
        ax_lr.plot(starts, [m["lr"] for m in metrics], "o", markersize=4, label="epoch start")
        lrs = [m["lr"] for m in metrics] + (list(lr_trace[1]) if lr_trace is not None else [])
        positive = [v for v in lrs if v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax_lr.set_yscale("log")
        ax_lr.legend(fontsize=9)
        best = max(metrics, key=lambda m: m["test_acc"])
        ax_acc.annotate(f"best {best['test_acc']:.2f}%", (best["epoch"], best["test_acc"]),
                        textcoords="offset points", xytext=(0, -16), ha="center", fontsize=9)
        for ax in (ax_loss, ax_acc):
            ax.legend(fontsize=9)
    for ax, name, xlabel in ((ax_loss, "loss", "epoch"), (ax_acc, "accuracy (%)", "epoch"),
                             (ax_lr, "learning rate", "epoch (batches within)")):
        ax.set_title(name, fontsize=12)
        ax.set_xlabel(xlabel, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return plots.save(fig, path)
