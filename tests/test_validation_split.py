"""data.val_split: a deterministic validation split held out of the training images, monitored and
selected on."""
from __future__ import annotations

import pytest
import torch

from beton.errors import UserError
from fastloader.config import DataConfig
from fastloader.loaders import train_val_indices
from train.config import build_config
from train.loop import fit
from train.run import RunDir

from .test_train import tiny


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
