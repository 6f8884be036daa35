"""LR schedules (train.optim.schedules) and LR functions (train.optim.lr_functions): plateau on any metric,
OneCycle exactly as torch defines it, start_lr, the linear schedule's per-role epochs."""
from __future__ import annotations

import pytest
import torch

from beton.errors import UserError
from train.config import OptimizerConfig, SchedulerConfig, build_config
from train.optim import build_optimizer, build_schedule
from train.optim.lr_functions import linear, linear_decay
from train.optim.roles import build_role_optimizer

from .test_airnet import SPEC, _net


def test_role_epochs_decays_one_roles_lr_over_its_own_epochs():
    """scheduler.role_epochs {whitening_bias: 1} over 3 epochs of 4 steps: that role's LR is
    linear_decay(s, 4), the rest linear_decay(s, 12); the trace equals LambdaLR with the functions written out."""
    from train.config import SchedulerConfig
    from train.optim import build_schedule

    optimizer = build_role_optimizer(_net(), SPEC)
    cfg = SchedulerConfig(name="linear", role_epochs={"whitening_bias": 1})
    schedule = build_schedule(optimizer, cfg, epochs=3, steps_per_epoch=4, base_lr=0.1)
    base = {g["role"]: g["lr"] for g in optimizer.param_groups}
    for s in range(1, 13):
        optimizer.step()
        schedule.scheduler.step()
        lrs = {g["role"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["whitening_bias"] == pytest.approx(base["whitening_bias"] * max(0.0, 1 - s / 4))
        assert lrs["head"] == pytest.approx(base["head"] * (1 - s / 12))
        assert lrs["filters"] == pytest.approx(base["filters"] * (1 - s / 12))


@pytest.mark.parametrize("kw, message", [
    ({"role_epochs": {"whitening": 3}}, "unknown role 'whitening'"),
    ({"role_epochs": {"head": 0}}, "role_epochs.head must be a positive"),
    ({"role_epochs": [3]}, "must be a mapping"),
    ({"name": "onecycle", "role_epochs": {"head": 2}}, "for the linear schedule"),
])
def test_role_epochs_bad_values_are_one_line_errors(kw, message):
    from train.config import SchedulerConfig

    with pytest.raises(UserError, match=message):
        SchedulerConfig(**{"name": "linear", **kw})


def test_role_epochs_for_a_role_the_optimizer_lacks_is_an_error():
    from train.config import SchedulerConfig
    from train.optim import build_schedule

    plain = torch.optim.SGD(_net().parameters(), lr=0.1)
    with pytest.raises(UserError, match="names whitening_bias, which this model and optimizer do not have"):
        build_schedule(plain, SchedulerConfig(name="linear", role_epochs={"whitening_bias": 1}), 3, 4, 0.1)


def test_linear_decay_values():
    assert linear_decay(0, 100) == 1.0 and linear_decay(50, 100) == 0.5 and linear_decay(100, 100) == 0.0
    assert linear_decay(99, 100) == pytest.approx(0.01) and linear_decay(150, 100) == 0.0
    assert linear_decay(0, 100, warmup=9) == pytest.approx(0.1) and linear_decay(9, 100, warmup=9) == 1.0
    assert linear_decay(4, 100, warmup=9) == pytest.approx(0.5)
    assert linear_decay(54.5, 100, warmup=9, end=0.2) == pytest.approx(0.6)  # halfway between warmup and total
    assert linear_decay(100, 100, warmup=9, end=0.2) == pytest.approx(0.2)
    assert linear(100, warmup=9)(9) == 1.0
    with pytest.raises(UserError, match="warmup < total"):
        linear_decay(0, 10, warmup=10)


ACCS = [10.0, 20.0, 20.0, 19.0, 20.0, 18.0, 25.0, 24.0, 24.0, 24.0, 24.0, 24.0, 30.0]


@pytest.mark.parametrize("monitor, values", [("test_acc", ACCS), ("val_loss", [3 - a / 10 for a in ACCS])])
def test_plateau_on_any_metric_matches_torch_driven_by_hand(monitor, values):
    model = torch.nn.Linear(2, 2)
    cfg = SchedulerConfig(name="plateau", monitor=monitor, factor=0.2, patience=3)
    assert cfg.mode == ("max" if monitor.endswith("acc") else "min")
    schedule = build_schedule(build_optimizer(model, OptimizerConfig(name="adam", lr=1e-3)), cfg, 40, 10, 1e-3)
    reference_opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(reference_opt, mode=cfg.mode, factor=0.2, patience=3)
    ours, theirs = [], []
    for v in values:
        schedule.after_epoch({"test_loss": 99.0, "test_acc": -1.0, monitor: v})
        reference.step(v)
        ours.append(schedule.lr)
        theirs.append(reference_opt.param_groups[0]["lr"])
    assert ours == theirs and min(ours) < 1e-3  # it did cut


def test_onecycle_with_torch_defaults_is_torch_onecycle_exactly_adam_beta1_included():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    cfg = OptimizerConfig(name="adam", lr=1e-3, weight_decay=1e-4)
    ours_opt = build_optimizer(a, cfg)
    schedule = build_schedule(ours_opt, SchedulerConfig(name="onecycle", max_lr=1e-3), 40, 196, 1e-3)
    theirs_opt = torch.optim.Adam(b.parameters(), lr=1e-3, weight_decay=1e-4)
    theirs = torch.optim.lr_scheduler.OneCycleLR(theirs_opt, max_lr=1e-3, epochs=40, steps_per_epoch=196)
    for _ in range(40 * 196 - 1):
        assert ours_opt.param_groups[0]["lr"] == theirs_opt.param_groups[0]["lr"]
        assert ours_opt.param_groups[0]["betas"] == theirs_opt.param_groups[0]["betas"]
        ours_opt.step(), theirs_opt.step()
        schedule.after_batch(), theirs.step()
    assert theirs_opt.param_groups[0]["betas"][0] == 0.95  # beta1 cycled back up


def test_start_lr_sets_the_first_and_last_lr_of_the_cycle():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    cfg = SchedulerConfig(name="onecycle", max_lr=0.4, start_lr=0.004, peak_epoch=5, final_div_factor=1)
    schedule = build_schedule(opt, cfg, 24, 10, 0.1)
    lrs = []
    for _ in range(240):
        lrs.append(schedule.lr)
        opt.step()
        schedule.after_batch()
    assert lrs[0] == pytest.approx(0.004) and max(lrs) == pytest.approx(0.4)
    assert lrs[-1] == pytest.approx(0.004, rel=0.01)  # no annihilation
    with pytest.raises(UserError, match="start_lr"):
        build_config({"scheduler": {"name": "plateau", "start_lr": 0.01}})
