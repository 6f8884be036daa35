"""`train.budget` (train.budget): a wall-time budget becomes a number of epochs, saved so resume and reruns
need no timing."""
from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest
import torch
import train.budget

from beton.errors import UserError
from train.config import EvalConfig, build_config
from train.hardware import resolve_precision
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
    monkeypatch.setattr(train.budget, "epoch_seconds", lambda s: train.budget.EpochCost(20.0, 5.0))  # 25 s an epoch
    cfg = build_config(tiny(learnable_betons, train__precision="fp32", train__epochs=50, train__budget="100s",
                            data__subset=200, data__test_subset=100))  # 4 runs: the epochs' length is not the point
    whole = RunDir(tmp_path / "whole")
    history = fit(cfg, whole)
    saved = whole.config()["train"]
    assert saved["budget"] is None and saved["epochs"] == len(history) == 3  # (100 s - start-up) // 25 s
    log = (whole.path / "train.log").read_text()
    assert "train.budget 100s: 3 epochs" in log
    startup = next(line for line in log.splitlines() if " start-up " in line)  # each phase named with its cost
    total = float(re.search(r"start-up ([\d.]+) s before the first epoch", startup)[1])
    phases = dict((name, float(sec)) for name, sec in re.findall(r"(?:: |, )([a-zA-Z ]+?) ([\d.]+) s", startup))
    assert {"model", "loaders", "budget probe", "the rest"} <= set(phases) and "LR range test" not in phases
    assert sum(phases.values()) == pytest.approx(total, abs=0.2)

    monkeypatch.setattr(train.budget, "epoch_seconds", _no_measuring)
    stopped = RunDir(tmp_path / "stopped")
    monkeypatch.setattr(train.budget, "epoch_seconds", lambda s: train.budget.EpochCost(20.0, 5.0))
    fit(cfg, stopped, stop_after=1)
    monkeypatch.setattr(train.budget, "epoch_seconds", _no_measuring)
    fit(build_config(stopped.config()), stopped, resume=True)
    assert stopped.metrics() == history

    rerun = RunDir(tmp_path / "rerun")
    assert fit(build_config(whole.config()), rerun) == history


def test_the_last_evaluations_extra_cost_takes_its_share_of_the_budget():
    # 600 s, 20 spent: 10 epochs of 58 s fit (580 s); a last evaluation 30 s dearer leaves room for 9
    assert train.budget.budget_epochs(600, 20, 50, 8, 100, last_extra_s=30) == 9
    assert train.budget.budget_epochs(600, 20, 50, 8, 100, last_extra_s=0) == 10


class _SlowModel(torch.nn.Module):
    """A forward pass of a fixed duration, so evaluation's cost is the number of passes it makes."""

    def forward(self, images):
        time.sleep(0.004)
        return torch.zeros(len(images), 10)


def _parts(eval_cfg, val_batches: int = 0):
    batch = (torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    return SimpleNamespace(test_loader=[batch] * 6, val_loader=[batch] * val_batches if val_batches else None,
                           precision=resolve_precision("fp32", torch.device("cpu")), device=torch.device("cpu"),
                           cfg=SimpleNamespace(eval=eval_cfg))


def test_evaluation_is_timed_as_the_loop_runs_it_tta_and_validation_split_included():
    model = _SlowModel()
    plain = train.budget.evaluation_seconds(_parts(EvalConfig()), model, None)
    with_val = train.budget.evaluation_seconds(_parts(EvalConfig(), val_batches=6), model, None)
    tta = EvalConfig(tta="flip_translate")
    with_tta = train.budget.evaluation_seconds(_parts(tta), model, tta)
    assert 1.6 < with_val / plain < 2.5  # twice the batches
    assert with_tta > 2.5 * plain  # flip and translate: several passes a batch


def test_the_budget_line_names_the_last_evaluations_tta(learnable_betons, monkeypatch):
    monkeypatch.setattr(train.budget, "epoch_seconds", lambda parts: train.budget.EpochCost(20.0, 5.0, 12.0))
    cfg = build_config(tiny(learnable_betons, train__epochs=50, train__budget="100s"))
    parts = SimpleNamespace(cfg=cfg)
    resolved, line = train.budget.resolve_budget(parts, time.perf_counter())
    assert resolved.train.epochs == 3  # (100 - 12) // 25
    assert "+ 12.0 s for the last evaluation's TTA" in line and "planned 87.0 s" in line


def test_budget_errors_are_one_line(learnable_betons):
    for bad in ("10x", "0s", "-5m"):
        with pytest.raises(UserError, match="train.budget"):
            build_config(tiny(learnable_betons, train__budget=bad))
