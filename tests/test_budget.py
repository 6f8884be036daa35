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
    plain = train.budget.evaluation_seconds(_parts(EvalConfig()), model, None, batches=4)
    with_val = train.budget.evaluation_seconds(_parts(EvalConfig(), val_batches=6), model, None, batches=4)
    tta = EvalConfig(tta="flip_translate")
    with_tta = train.budget.evaluation_seconds(_parts(tta), model, tta, batches=4)
    assert train.budget.evaluation_seconds(_parts(tta), model, tta, batches=4, warm_up=False) > 2.5 * plain
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


def _planned(learnable_betons, **plan):
    """A linear-schedule config whose budget planned 5 epochs (at most 10) of 80 s training + 10 s evaluation."""
    plan = {"seconds": 600.0, "max_epochs": 10, "epochs": 5, "train_seconds": 80.0, "eval_seconds": 10.0,
            "last_extra_seconds": 20.0, "spent_seconds": 50.0, **plan}
    return build_config(_linear(learnable_betons, train__epochs=5, train__budget_plan=plan))


def _linear(learnable_betons, **over) -> dict:
    """`tiny` on the linear schedule (down to 0 at the last step), which a corrected plan reshapes."""
    return {**tiny(learnable_betons, **over), "scheduler": {"name": "linear"}}


@pytest.mark.parametrize("elapsed, train_s, eval_s, expected", [
    (100, 40, 10, 10),  # faster than planned: 1 + (600 - 100 - 20) // 50 = 10, the config's cap
    (100, 30, 10, 10),  # ... and the cap holds
    (150, 90, 10, 5),  # as planned: 1 + (600 - 150 - 20) // 100 = 5, the plan holds
    (250, 200, 20, 2),  # slower, and evaluation twice the probe's: its TTA extra doubles: 1 + (600 - 250 - 40) // 220
    (590, 200, 20, 2),  # the budget spent: one more epoch all the same (the evaluation just done had no TTA)
])
def test_the_first_epoch_corrects_the_plan(learnable_betons, elapsed, train_s, eval_s, expected):
    cfg = _planned(learnable_betons)
    fixed, line = train.budget.corrected(cfg, elapsed_s=elapsed, train_s=train_s, eval_s=eval_s)
    assert fixed.train.epochs == expected and line.startswith(f"train.budget: epoch 1 took {train_s + eval_s:.1f} s")
    if expected == 5:
        assert fixed is cfg and "the plan of 5 epochs holds" in line
    else:
        plan = fixed.train.budget_plan
        assert (plan.epochs, plan.corrected_at_epoch, plan.corrected_epoch_seconds) == (5, 1, train_s + eval_s)
        assert f"{expected} epochs now, not 5" in line
        assert build_config(fixed.to_dict()) == fixed  # config.yaml holds it


def test_only_a_schedule_that_can_change_its_length_is_corrected(learnable_betons):
    assert train.budget.correctable(_planned(learnable_betons))
    assert not train.budget.correctable(_planned(learnable_betons, epochs=1))  # its schedule has run its course
    assert not train.budget.correctable(_planned(learnable_betons, corrected_at_epoch=1))  # once only
    onecycle = build_config({**_planned(learnable_betons).to_dict(), "scheduler": {"name": "onecycle"}})
    assert not train.budget.correctable(onecycle)  # torch's OneCycleLR fixes its length when built


def test_a_corrected_linear_schedule_continues_without_a_jump_and_ends_at_zero():
    from train.optim.lr_functions import linear, replanned

    planned = linear(60)
    longer, shorter = replanned(planned, 20, 60, 100), replanned(planned, 20, 60, 40)
    for fn in (longer, shorter):
        assert [fn(s) for s in range(21)] == [planned(s) for s in range(21)]  # the first plan up to the switch
    assert longer(100) == shorter(40) == 0.0
    assert longer(60) == pytest.approx(planned(40)) and shorter(30) == pytest.approx(planned(40))  # half-way on
    with pytest.raises(UserError):
        replanned(planned, 60, 60, 100)  # switching at the planned end: nothing left to stretch


@pytest.mark.slow
def test_a_corrected_plan_trains_its_epochs_and_resume_at_the_switch_is_exact(learnable_betons, tmp_path,
                                                                               monkeypatch):
    # the probe says 25 s an epoch, so 3 fit in 100 s; the real epochs take about a second, so after the first
    # the plan becomes the config's 5
    monkeypatch.setattr(train.budget, "epoch_seconds", lambda parts: train.budget.EpochCost(20.0, 5.0))
    cfg = build_config(_linear(learnable_betons, train__precision="fp32", train__epochs=5, train__budget="100s",
                               data__subset=200, data__test_subset=100))
    whole = RunDir(tmp_path / "whole")
    history = fit(cfg, whole)
    saved = whole.config()["train"]
    assert len(history) == saved["epochs"] == 5
    assert (saved["budget_plan"]["epochs"], saved["budget_plan"]["corrected_at_epoch"]) == (3, 1)
    log = (whole.path / "train.log").read_text()
    assert "train.budget 100s: 3 epochs" in log and "5 epochs now, not 3" in log
    assert re.search(r"train\.budget: planned [\d.]+ s an epoch \(corrected after epoch 1; .*used \d+ s of 100 s", log)
    # 2 steps an epoch: 6 planned, 10 after the switch at step 2; each epoch's first LR follows the first plan
    # to the switch, then the rest of its fall, stretched: 1 - s/6 at s = 0, 2, then at 2 + (s - 2) / 2
    assert [m["lr"] for m in history] == pytest.approx([0.05 * f for f in (1, 4 / 6, 3 / 6, 2 / 6, 1 / 6)])

    monkeypatch.setattr(train.budget, "epoch_seconds", lambda parts: train.budget.EpochCost(20.0, 5.0))
    stopped = RunDir(tmp_path / "stopped")
    fit(cfg, stopped, stop_after=1)  # stops right after the correction
    assert stopped.config()["train"]["epochs"] == 5
    monkeypatch.setattr(train.budget, "epoch_seconds", _no_measuring)
    monkeypatch.setattr(train.budget, "corrected", _no_measuring)
    fit(build_config(stopped.config()), stopped, resume=True)
    assert stopped.metrics() == history
    assert fit(build_config(whole.config()), RunDir(tmp_path / "rerun")) == history
