"""Confusion matrix, per-class accuracy (printed as the seeds print it) and the most-confused pairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import plots


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts: row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    flat = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """Class name -> accuracy in percent (two decimals); None for a class absent from the split."""
    totals = cm.sum(1)
    return {name: (round(100.0 * cm[i, i] / totals[i], 2) if totals[i] else None) for i, name in enumerate(classes)}


def per_class_lines(cm: np.ndarray, classes: list[str]) -> list[str]:
    """The seeds' lines: 'Accuracy of plane : 90 %' (whole percent, rounded down, as '%2d' does)."""
    lines = []
    for i, name in enumerate(classes):
        total = int(cm[i].sum())
        acc = "n/a" if total == 0 else "%2d" % (100 * int(cm[i, i]) // total)
        lines.append("Accuracy of %5s : %s %%" % (name, acc))
    return lines


def most_confused(cm: np.ndarray, classes: list[str], k: int = 5) -> list[dict]:
    """The k largest off-diagonal cells: true class, predicted class, count, share of the true class (%)."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")
    totals = cm.sum(1)
    pairs = []
    for flat in order[:k]:
        i, j = divmod(int(flat), cm.shape[1])
        if off[i, j] == 0:
            break
        pairs.append({"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
                      "percent_of_true": round(100.0 * off[i, j] / totals[i], 2)})
    return pairs


def plot_confusion(cm: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> Path:
    """Counts and row-normalised (% of each true class) side by side."""
    plt = plots.plt
    k = len(classes)
    totals = cm.sum(1, keepdims=True)
    normalised = np.divide(100.0 * cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    side = max(5.0, min(0.55 * k + 2, 22.0))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side))
    annotate = k <= 20
    fontsize = 9 if k <= 10 else 7
    for ax, data, label, fmt in ((axes[0], cm, "count", "{:d}"), (axes[1], normalised, "% of true class", "{:.0f}")):
        im = ax.imshow(data, cmap="Blues", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if k <= 30:
            ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=fontsize)
            ax.set_yticks(range(k), classes, fontsize=fontsize)
        if annotate:
            cutoff = data.max() / 2 if data.max() else 1
            for i in range(k):
                for j in range(k):
                    value = int(data[i, j]) if fmt == "{:d}" else data[i, j]
                    ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=fontsize - 1,
                            color="white" if data[i, j] > cutoff else "black")
    axes[0].set_title("confusion matrix (counts)", fontsize=12)
    axes[1].set_title("row-normalised (% of each true class)", fontsize=12)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return plots.save(fig, path)
