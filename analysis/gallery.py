"""Which misclassified test images to show, their titles, and the gallery picture.

Images are the split's raw RGB pixels (`fastloader.loaders.read_split`, dataset order), so
the gallery shows exactly what was stored, not a de-normalised approximation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from beton.errors import UserError

from . import plots
from .predictions import Predictions

PICKS = ("most-confident", "first", "random")


def check_pick(pick: str) -> None:
    if pick not in PICKS:
        raise UserError(f"--pick must be one of {', '.join(PICKS)}, got {pick!r}")


def pick_misclassified(preds: Predictions, n: int, pick: str = "most-confident",
                       seed: int = 0) -> tuple[np.ndarray, str | None]:
    """Up to `n` positions (into `preds`) of misclassified samples, in gallery order, and a note
    when fewer than `n` exist.

    most-confident: the most confident wrong predictions first; first: dataset order;
    random: a seeded random draw, in draw order.
    """
    check_pick(pick)
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    wrong = np.flatnonzero(preds.predicted != preds.labels)
    note = None
    if len(wrong) < n:
        note = (f"note: only {len(wrong)} of {len(preds.labels)} test images are misclassified; "
                f"showing {len(wrong)} instead of {n}")
    if pick == "most-confident":
        conf = preds.confidence[wrong]
        order = wrong[np.argsort(-conf, kind="stable")]
    elif pick == "first":
        order = wrong[np.argsort(preds.indices[wrong], kind="stable")]
    else:
        order = np.random.default_rng(seed).permutation(wrong)
    return order[:n], note


def titles(classes: list[str], true: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> list[str]:
    """'true / predicted (confidence%)', wrapped after the slash when long."""
    out = []
    for t, p, c in zip(true, predicted, confidence):
        text = f"{classes[t]} / {classes[p]} ({100 * c:.0f}%)"
        if len(text) > 28:
            text = f"{classes[t]} /\n{classes[p]} ({100 * c:.0f}%)"
        out.append(text)
    return out


def plot_gallery(images: np.ndarray, labels: list[str], path: str | Path, suptitle: str) -> Path:
    fig = plots.image_grid(images, labels, suptitle, empty_text="no misclassified test images")
    return plots.save(fig, path)
