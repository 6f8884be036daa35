"""The options seed fidelity needs: plateau on any metric, a validation split, clipping by value,
ResNet strides, OneCycle exactly as torch defines it, and `start_lr: find`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from beton.errors import UserError
from fastloader.config import DataConfig
from fastloader.loaders import train_val_indices
from train.config import ModelConfig, OptimizerConfig, SchedulerConfig, build_config
from train.hardware import Precision
from train.lr_find import descent_start
from train.models import count_parameters, create_model
from train.optim import build_optimizer, build_schedule
from train.step import Step, train_step

from .test_train import tiny

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


def test_val_monitor_and_val_selection_need_a_split(learnable_betons):
    with pytest.raises(UserError, match="data.val_split"):
        build_config(tiny(learnable_betons, scheduler__name="plateau", scheduler__monitor="val_acc"))
    with pytest.raises(UserError, match="data.val_split"):
        build_config(tiny(learnable_betons, train__select_best_on="val"))
    with pytest.raises(UserError, match="scheduler.monitor"):
        build_config(tiny(learnable_betons, scheduler__monitor="train_acc"))


def test_validation_split_is_deterministic_disjoint_and_covers_the_pool():
    cfg = DataConfig(val_split=100, subset=1000, seed=3)
    train, val = train_val_indices(50_000, cfg)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    again_train, again_val = train_val_indices(50_000, DataConfig(val_split=100, subset=1000, seed=3))
    assert (again_val == val).all() and (again_train == train).all()
    other = train_val_indices(50_000, DataConfig(val_split=100, subset=1000, seed=4))[1]
    assert set(other) != set(val)
    assert train_val_indices(50_000, DataConfig())[1] is None
    with pytest.raises(UserError, match="leaves no training images"):
        train_val_indices(50, DataConfig(val_split=50))


@pytest.mark.slow
def test_a_run_with_a_validation_split_reports_and_selects_on_it(learnable_betons, tmp_path):
    from train.loop import fit
    from train.run import RunDir
    from train.sweep import sweep

    raw = tiny(learnable_betons, data__val_split=200, train__select_best_on="val", train__epochs=2,
               train__precision="fp32", scheduler__name="plateau", scheduler__monitor="val_acc")
    run = RunDir(tmp_path / "run")
    history = fit(build_config(raw), run)
    assert {"val_loss", "val_acc", "val_correct", "val_count"} <= set(history[0])
    assert history[0]["val_count"] == 200
    log = (run.path / "train.log").read_text()
    assert "800 train / 200 test images" in log and "Val: loss" in log
    best = torch.load(run.best, weights_only=True)
    best_epoch = max(history, key=lambda m: m["val_acc"])["epoch"]
    assert best["epoch"] == best_epoch and run.summary()["best_epoch"] == best_epoch
    import yaml

    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "tiny.yaml").write_text(yaml.safe_dump(raw))
    results = sweep([tmp_path / "cfgs"], [], tmp_path / "sweep").read_text()
    assert "| Val Accuracy |" in results.splitlines()[2]


def _grads_after_step(clip_value, clip_norm, scaled):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = Precision("test", None, scaled)  # scaled: a live GradScaler on the CPU
    step = Step(model, optimizer, precision, torch.device("cpu"), precision.scaler(torch.device("cpu")),
                grad_clip=clip_norm, grad_clip_value=clip_value)
    x, y = torch.randn(32, 8) * 10, torch.randint(0, 4, (32,))
    train_step(step, x, y)
    return {k: start[k] - v for k, v in model.state_dict().items()}, start, (x, y)  # lr 1: the applied gradient


@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_by_value_matches_torch_on_every_step_path(scaled):
    applied, start, (x, y) = _grads_after_step(0.01, None, scaled)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference.load_state_dict(start)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    grads = {name: p.grad.clamp(-0.01, 0.01) for name, p in reference.named_parameters()}
    assert max(g.abs().max() for g in applied.values()) <= 0.01 + 1e-7
    for name, g in grads.items():
        torch.testing.assert_close(applied[name], g, rtol=1e-4, atol=1e-6)
    assert any((g.abs() > 0.0099).any() for g in applied.values())  # the clip was binding


def test_resnet_strides_keep_parameters_and_grad_cam_picks_layer4_at_8x8():
    from analysis.gradcam import default_layer

    for name, count in (("resnet18", 11_173_962), ("resnet34", 21_282_122)):
        for norm in ("batch", "layer"):
            model = create_model(ModelConfig(name=name, norm=norm, strides=[1, 1, 2, 2]))
            assert count_parameters(model) == count
    model = create_model(ModelConfig(name="resnet18", norm="layer", strides=[1, 1, 2, 2]))
    assert default_layer(model) == ("layer4", (8, 8))
    assert default_layer(create_model("resnet18"))[0] == "layer3"  # 4x4 at layer4 with the default strides
    with pytest.raises(UserError, match="strides"):
        create_model(ModelConfig(name="fastnet", strides=[1, 1, 2, 2]))
    with pytest.raises(UserError, match="strides"):
        create_model(ModelConfig(name="resnet18", strides=[1, 1, 2]))


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


def test_descent_start_is_where_the_longest_fall_begins():
    lrs = list(np.logspace(-6, 1, 50))
    loss = list(2.3 + 0.001 * np.arange(10)) + list(np.linspace(2.3, 0.5, 30)) + list(np.linspace(0.5, 5, 10))
    assert descent_start(lrs, loss) == pytest.approx(lrs[9])  # the rise ends at 9, the fall runs to 39
