"""train.epochs with a fraction (hiverge's 7.6 epochs): the loop trains the last epoch's first part, and every
schedule, the budget, resume and the LR replay count the same steps (`train.config.steps_in`)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
import train.budget

from analysis.schedule import replay_lr
from train.config import SchedulerConfig, build_config, steps_in
from train.loop import fit
from train.optim import build_schedule
from train.optim.schedules import SCHEDULERS
from train.run import RunDir

from .train_fixtures import tiny


def test_steps_and_the_batches_of_each_epoch():
    assert steps_in(7.6, 32) == 244 and steps_in(8, 32) == 256 and steps_in(0.01, 32) == 1
    assert steps_in(0.1 * 3, 10) == 3  # 0.30000000000000004 x 10 is 3 steps, not 4
    cfg = build_config({"train": {"epochs": 2.5}})
    assert cfg.train.loop_epochs == 3 and [cfg.train.epoch_batches(e, 10) for e in range(3)] == [10, 10, 5]
    whole = build_config({"train": {"epochs": 3.0}}).train
    assert whole.epochs == 3 and isinstance(whole.epochs, int) and whole.loop_epochs == 3


def _lrs(name: str, epochs: float, steps_per_epoch: int, steps: int) -> list[float]:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = build_schedule(optimizer, SchedulerConfig(name=name), epochs, steps_per_epoch, 0.1)
    if not schedule.per_batch:
        return []
    found = []
    for _ in range(steps):
        found.append(schedule.lr)
        optimizer.step()
        schedule.after_batch()
    return found + [schedule.lr]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_per_step_schedule_ends_at_a_fractional_epochs_last_step(name):
    """Every schedule of the registry (a new one included): 1.5 epochs of 10 steps run the course of 15 steps,
    as one epoch of 15 does; per-epoch schedules count the partial epoch as an epoch (the loop's test below)."""
    assert _lrs(name, 1.5, 10, 15) == _lrs(name, 1, 15, 15)


SCHEDULES = {
    "linear": {"name": "linear", "end_factor": 0.0},  # per step, to zero at the run's last step
    "step": {"name": "step", "step_size": 1, "gamma": 0.5},  # per epoch: the partial epoch is an epoch
}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_a_fractional_run_trains_part_of_its_last_epoch_and_resumes_exactly(learnable_betons, tmp_path, schedule):
    # 5 batches an epoch; 1.5 epochs are 8 steps: 5, then 3 of the second epoch
    raw = {**tiny(learnable_betons, train__epochs=1.5, train__precision="fp32", data__subset=500,
                  data__test_subset=100), "scheduler": SCHEDULES[schedule]}
    cfg = build_config(raw)
    whole = RunDir(tmp_path / "whole")
    history = fit(cfg, whole)
    assert [m["epoch"] for m in history] == [1, 2]
    state = torch.load(whole.last, weights_only=True)
    steps = state["schedule"]["scheduler"].get("last_epoch")
    assert steps == (2 if schedule == "step" else 8)  # torch schedulers count their steps
    assert whole.summary()["complete"] and whole.summary()["epochs"] == 1.5
    if schedule == "linear":
        assert state["optimizer"]["param_groups"][0]["lr"] == 0.0  # the fall ends at the last step taken
    trace = replay_lr(cfg, whole.metrics(), 5)
    assert trace is not None and len(trace.x) == 8 and trace.x[-1] == pytest.approx(7 / 5)

    stopped = RunDir(tmp_path / "stopped")
    fit(cfg, stopped, stop_after=1)
    fit(cfg, stopped, resume=True)
    assert (stopped.path / "metrics.jsonl").read_bytes() == (whole.path / "metrics.jsonl").read_bytes()
    a, b = state["model"], torch.load(stopped.last, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_budget_plans_whole_epochs_or_all_of_a_fractional_run(learnable_betons, monkeypatch):
    assert train.budget.budget_epochs(1000, 0, 10, 0, 7.6) == 7.6  # all of it fits
    assert train.budget.budget_epochs(55, 0, 10, 0, 7.6) == 5
    assert train.budget.budget_epochs(5, 0, 10, 0, 0.5) == 0.5  # less than an epoch: at most the config's
    assert train.budget.planned_seconds(7.6, 10, 1, 4) == pytest.approx(76 + 8 + 4)  # 8 evaluations, 7.6 trainings
    monkeypatch.setattr(train.budget, "epoch_seconds", lambda parts: train.budget.EpochCost(20.0, 5.0, 0.0))
    cfg = build_config({**tiny(learnable_betons, train__epochs=2.5, train__budget="1h"),
                        "scheduler": {"name": "linear"}})
    resolved, line = train.budget.resolve_budget(SimpleNamespace(cfg=cfg), time.perf_counter())
    assert resolved.train.epochs == 2.5 and "2.5 epochs (at most 2.5)" in line
    assert build_config(resolved.to_dict()) == resolved  # config.yaml holds the plan
    # after a slow first epoch, the correction plans whole epochs again; a fast one keeps the fraction
    slow, _ = train.budget.corrected(resolved, elapsed_s=3000, train_s=600, eval_s=0)
    fast, _ = train.budget.corrected(resolved, elapsed_s=30, train_s=20, eval_s=5)
    assert slow.train.epochs == 2 and fast.train.epochs == 2.5
