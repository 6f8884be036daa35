"""curves.png and the LR replay behind it: whole-epoch ticks on one epoch axis shared by the three panels, the LR
of every optimizer step (one line per parameter role), the best epoch marked in the legend, and the steps per
epoch the replay assumes (data.subset, data.val_split, drop_last)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.curves import plot_curves
from analysis.schedule import replay_lr, steps_per_epoch
from train.config import build_config, load_config

from .train_fixtures import tiny

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def linear_metrics(lr: float, epochs: int, steps: int) -> list[dict]:
    """Metrics lines of a run under the linear schedule (no warm-up, to 0): epoch e starts at lr * (1 - e / epochs)."""
    return [{"epoch": e + 1, "lr": lr * (1 - e * steps / (epochs * steps)), "train_loss": 2.0 - 0.3 * e,
             "train_acc": 30.0 + 10 * e, "test_loss": 2.1 - 0.3 * e, "test_acc": 28.0 + 9 * e + (e == 1) * 20}
            for e in range(epochs)]


def test_curves_share_one_epoch_axis_with_whole_ticks_and_a_per_step_lr(tmp_path):
    cfg = build_config({**tiny("/nowhere"), "scheduler": {"name": "linear"}})
    steps = 10
    metrics = linear_metrics(cfg.optimizer.lr, cfg.train.epochs, steps)
    trace = replay_lr(cfg, metrics, steps)
    assert trace is not None and list(trace.lr) == ["lr"]
    assert len(trace.x) == len(trace.first) == cfg.train.epochs * steps  # one LR per optimizer step
    assert trace.x[0] == 0 and trace.x[-1] == pytest.approx(cfg.train.epochs - 1 / steps)
    assert np.allclose(trace.first, cfg.optimizer.lr * (1 - np.arange(30) / 30))

    path, axes = plot_curves(metrics, tmp_path / "curves.png", trace, best_on="test")
    assert path.read_bytes()[:4] == b"\x89PNG"
    ax_loss, ax_acc, ax_lr = axes
    for ax in axes:  # one axis: 0 to the last epoch, ticked at whole epochs only
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [0, 1, 2, 3]
        assert ax.get_xlim() == axes[0].get_xlim()
    lr_lines = ax_lr.get_lines()
    assert len(lr_lines) == 1 and len(lr_lines[0].get_xdata()) == 30  # the per-step trace, not three dots
    assert list(ax_loss.get_lines()[0].get_xdata()) == [1, 2, 3]  # epoch e's metrics where it ends
    # the best epoch is a marker with its own legend entry, no text drawn over the curves
    assert not ax_acc.texts
    best = [line for line in ax_acc.get_lines() if line.get_label().startswith("best")]
    assert len(best) == 1 and best[0].get_label() == "best test 57.00% (epoch 2)"
    assert list(best[0].get_xdata()) == [2] and list(best[0].get_ydata()) == [57.0]
    assert "best test 57.00% (epoch 2)" in [t.get_text() for t in ax_acc.get_legend().get_texts()]


def test_a_roles_run_replays_every_roles_lr():
    """speed94's roles: Muon's filters at 0.24, SGD at 106 and 1340, the whitening bias's LR at 0 after its 3 epochs
    (its model built on the meta device: no weights, no betons)."""
    cfg = load_config(CONFIGS / "speed94.yaml", ["train.epochs=4"])
    steps = 5
    metrics = linear_metrics(0.24, 4, steps)
    trace = replay_lr(cfg, metrics, steps)
    assert trace is not None
    assert list(trace.lr) == ["filters", "norm_biases", "whitening_bias", "head"]
    assert [round(float(v[0]), 6) for v in trace.lr.values()] == [0.24, 106.0, 106.0, 1340.0]
    assert all(len(v) == 4 * steps for v in trace.lr.values())
    whitening = trace.lr["whitening_bias"]
    assert whitening[3 * steps - 1] > 0 and np.all(whitening[3 * steps:] == 0)  # its decay ends with epoch 3
    assert np.allclose(trace.lr["head"], 1340.0 * (1 - np.arange(20) / 20))


def test_the_replay_is_dropped_where_it_disagrees_with_the_recorded_lrs(tmp_path):
    cfg = build_config({**tiny("/nowhere"), "scheduler": {"name": "none"}})  # a constant LR ...
    metrics = linear_metrics(cfg.optimizer.lr, cfg.train.epochs, 10)  # ... where the run recorded a falling one
    assert replay_lr(cfg, metrics, 10) is None
    _, axes = plot_curves(metrics, tmp_path / "curves.png", None)
    points = axes[2].get_lines()
    assert len(points) == 1 and list(points[0].get_xdata()) == [0, 1, 2]  # the recorded epoch starts


@pytest.mark.parametrize("data, expected", [
    ({}, 10),
    ({"subset": 950}, 9),
    ({"subset": 950, "drop_last": False}, 10),
    ({"val_split": 150}, 8),  # the held-out images are not trained on
    ({"subset": 500, "val_split": 100, "drop_last": False}, 4),
])
def test_steps_per_epoch_counts_the_images_trained_on(data, expected):
    raw = tiny("/nowhere")
    raw["data"].update(data)
    assert steps_per_epoch(build_config(raw), 1000) == expected
