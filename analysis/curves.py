"""curves.png: train/test loss, train/test accuracy and the LR of every step, on one epoch axis (three panels).

Epoch e's loss and accuracy are drawn at x = e (where the epoch ends); the LR of each optimizer step at
its fractional epoch, from 0 to the last epoch (`analysis.schedule.replay_lr`: one line per parameter
role), so all three panels share the axis, ticked at whole epochs. Where the schedule cannot be replayed,
the LRs the epochs started with (metrics.jsonl) are drawn at x = e - 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from . import plots
from .schedule import LRTrace

LOG_RATIO = 20  # the LR panel turns logarithmic where the largest LR is more than this times the smallest


def epoch_axis(ax, epochs: int) -> None:
    """x from 0 to `epochs` (a little beyond, so markers at the ends show whole), ticked at whole epochs only."""
    pad = 0.03 * max(epochs, 1)
    ax.set_xlim(-pad, max(epochs, 1) + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def draw_lr(ax, trace: LRTrace | None, metrics: list[dict], label: str = "") -> None:
    """The LR panel's lines: every step's LR (one line per role), or the recorded epoch-start LRs as points."""
    if trace is not None:
        for role, lrs in trace.lr.items():
            ax.plot(trace.x, lrs, linewidth=1.5, label=label or ("per step" if role == "lr" else role))
    else:
        ax.plot([m["epoch"] - 1 for m in metrics], [m["lr"] for m in metrics], "o", markersize=4,
                label=label or "epoch start (no per-step replay)")


def log_scale_where_wide(ax) -> None:
    """A log y axis where the positive LRs drawn span more than LOG_RATIO (zeros then leave the panel)."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [np.zeros(0)])
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() > LOG_RATIO:
        ax.set_yscale("log")


def plot_curves(metrics: list[dict], path: str | Path, lr_trace: LRTrace | None = None, title: str = "",
                best_on: str = "test"):
    """Three panels: loss, accuracy (train, test and val where split, per epoch), LR (per step where replayed).
    `best_on`: the split whose best accuracy is marked (train.select_best_on). Returns the saved path and the
    figure's axes (loss, accuracy, LR)."""
    plt = plots.plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax_loss, ax_acc, ax_lr = axes
    if not metrics:
        for ax in axes:
            ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=ax.transAxes)
    else:
        epochs = [m["epoch"] for m in metrics]
        style = dict(marker="o", markersize=3 if len(epochs) > 30 else 4)
        splits = ["train", "test"] + (["val"] if all("val_acc" in m for m in metrics) else [])
        for split in splits:
            ax_loss.plot(epochs, [m[f"{split}_loss"] for m in metrics], label=split, **style)
            ax_acc.plot(epochs, [m[f"{split}_acc"] for m in metrics], label=split, **style)
        key = f"{best_on}_acc" if best_on in splits else "test_acc"
        best = max(metrics, key=lambda m: m[key])  # the first of equals, as the best checkpoint keeps it
        ax_acc.plot([best["epoch"]], [best[key]], "*", color="gold", markeredgecolor="black", markersize=14,
                    label=f"best {key[:-4]} {best[key]:.2f}% (epoch {best['epoch']})", zorder=5)
        draw_lr(ax_lr, lr_trace, metrics)
        log_scale_where_wide(ax_lr)
        for ax in axes:
            ax.legend(fontsize=9)
            epoch_axis(ax, epochs[-1])
    for ax, name in zip(axes, ("loss", "accuracy (%)", "learning rate")):
        ax.set_title(name, fontsize=12)
        ax.set_xlabel("epoch", fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return plots.save(fig, path), axes
