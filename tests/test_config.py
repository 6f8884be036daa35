"""The config reads the names it accepts from the registries that define them, without loading torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

from beton.errors import UserError
from train.config import build_config


def test_scheduler_and_optimizer_names_are_the_registries(monkeypatch):
    from train.optim.optimizers import OPTIMIZERS
    from train.optim.schedules import SCHEDULERS

    with pytest.raises(UserError) as error:
        build_config({"scheduler": {"name": "warm"}})
    message = str(error.value)
    assert "\n" not in message and "scheduler.name" in message and ", ".join(SCHEDULERS) in message
    monkeypatch.setitem(SCHEDULERS, "warm", SCHEDULERS["none"])  # a new schedule is its registry line
    monkeypatch.setitem(OPTIMIZERS, "sgd2", OPTIMIZERS["sgd"])
    cfg = build_config({"scheduler": {"name": "warm"}, "optimizer": {"name": "sgd2"}})
    assert (cfg.scheduler.name, cfg.optimizer.name) == ("warm", "sgd2")


def test_a_config_is_checked_without_loading_torch():
    """Mistakes in a config are reported before torch loads (seconds): the registries' names load without it."""
    code = ("import sys\nfrom train.config import build_config\n"
            "build_config({'optimizer': {'name': 'roles', 'roles': {'filters': {'name': 'muon', 'lr': 1}}},"
            " 'scheduler': {'name': 'linear', 'role_epochs': {'whitening_bias': 2}}})\n"
            "print(sorted(m for m in ('torch', 'ffcv') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("scheduler, train, expected", [
    ({"name": "linear", "role_epochs": {"whitening_bias": 3}}, {}, 3),  # speed94: the epochs stated once
    ({"name": "linear", "role_epochs": {"whitening_bias": 2.5}}, {}, 3),  # frozen from the first epoch after
    ({"name": "linear", "role_epochs": {"whitening_bias": 3}}, {"whitening_bias_epochs": 1}, 1),  # set: kept
    ({"name": "linear", "role_epochs": {"head": 2}}, {}, None),
    ({"name": "linear"}, {"whitening_bias_epochs": 2}, 2),
])
def test_the_whitening_bias_freeze_follows_its_role_epochs_unless_set(scheduler, train, expected):
    cfg = build_config({"scheduler": scheduler, "train": train})
    assert cfg.train.whitening_bias_epochs == expected
    assert build_config(cfg.to_dict()).train.whitening_bias_epochs == expected  # config.yaml reads back
