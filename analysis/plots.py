"""matplotlib on the Agg backend (no display needed) and atomic PNG output."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: pictures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from beton.atomic import atomic_path  # noqa: E402

DPI = 100
UPSCALE = 4  # 32x32 pixels -> 128x128, nearest neighbour: readable, no invented detail


def save(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG to `path` atomically, then close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def upscale(images: np.ndarray, factor: int = UPSCALE) -> np.ndarray:
    """Nearest-neighbour upscaling of N x H x W [x C] images."""
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def image_grid(images: np.ndarray, titles: list[str], suptitle: str, columns: int = 5,
               empty_text: str = "nothing to show", factor: int = UPSCALE):
    """A grid of RGB images (N x H x W x 3, uint8 or float in [0, 1]), one title each, upscaled
    `factor` times (nearest); returns the figure."""
    n = len(images)
    if n == 0:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", fontsize=12)
        fig.suptitle(suptitle, fontsize=12)
        return fig
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows + 0.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(upscale(images[k : k + 1], factor)[0], interpolation="nearest")
            ax.set_title(titles[k], fontsize=9)
    fig.suptitle(suptitle, fontsize=12)
    fig.tight_layout()
    return fig
