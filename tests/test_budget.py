"""`train.budget` (train.budget): a wall-time budget becomes a number of epochs, saved so resume and reruns
need no timing."""
from __future__ import annotations

import pytest
import train.budget

from beton.errors import UserError
from train.config import build_config
from train.loop import fit
from train.run import RunDir

from .test_precision import _no_measuring
from .test_train import tiny


@pytest.mark.parametrize("budget, spent, train_s, eval_s, cap, expected", [
    (600, 20, 50, 8, 100, 10), (600, 20, 50, 8, 5, 5), (60, 50, 50, 8, 100, 1), (100, 0, 25, 0, 100, 4)])
def test_budget_epochs(budget, spent, train_s, eval_s, cap, expected):
    assert train.budget.budget_epochs(budget, spent, train_s, eval_s, cap) == expected


@pytest.mark.slow
def test_budget_fixes_the_epochs_and_resume_and_reruns_need_no_timing(learnable_betons, tmp_path, monkeypatch):
    monkeypatch.setattr(train.budget, "epoch_seconds", lambda s: (20.0, 5.0))  # 25 s an epoch
    cfg = build_config(tiny(learnable_betons, train__precision="fp32", train__epochs=50, train__budget="100s",
                            data__subset=200, data__test_subset=100))  # 4 runs: the epochs' length is not the point
    whole = RunDir(tmp_path / "whole")
    history = fit(cfg, whole)
    saved = whole.config()["train"]
    assert saved["budget"] is None and saved["epochs"] == len(history) == 3  # (100 s - start-up) // 25 s
    assert "train.budget 100s: 3 epochs" in (whole.path / "train.log").read_text()

    monkeypatch.setattr(train.budget, "epoch_seconds", _no_measuring)
    stopped = RunDir(tmp_path / "stopped")
    monkeypatch.setattr(train.budget, "epoch_seconds", lambda s: (20.0, 5.0))
    fit(cfg, stopped, stop_after=1)
    monkeypatch.setattr(train.budget, "epoch_seconds", _no_measuring)
    fit(build_config(stopped.config()), stopped, resume=True)
    assert stopped.metrics() == history

    rerun = RunDir(tmp_path / "rerun")
    assert fit(build_config(whole.config()), rerun) == history


def test_budget_errors_are_one_line(learnable_betons):
    for bad in ("10x", "0s", "-5m"):
        with pytest.raises(UserError, match="train.budget"):
            build_config(tiny(learnable_betons, train__budget=bad))
