"""A model that needs the data or trains some parameters its own way says so through hooks (`train.models`):
the set-up, the parameter roles and the epoch boundary call them for any model, so a new model of that kind is
one file plus one registry line, and the generic code never names it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from train.config import build_config
from train.models import MODELS
from train.optim.roles import roles
from train.parts import build
from train.state import start_training

from .test_train import tiny


class Calibrated(nn.Module):
    """A toy model part with all three hooks: an offset set from the data, a role for it, and a freeze."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(3))
        self.seen: dict = {}

    def fit_to_data(self, data, mean, std) -> None:
        self.seen.update(folder=data.folder(), mean=list(mean), std=list(std))
        with torch.no_grad():
            self.offset.copy_(-torch.tensor(mean) / torch.tensor(std))

    def param_role(self, name: str, param: nn.Parameter) -> str:
        return "whitening_bias"

    def begin_epoch(self, epoch: int, train_cfg) -> None:
        self.seen.setdefault("epochs", []).append(epoch)
        if epoch >= 1:
            self.offset.requires_grad_(False)

    def forward(self, x):
        return x + self.offset.view(1, 3, 1, 1)


def toy(num_classes: int = 10, norm: str = "batch") -> nn.Module:
    return nn.Sequential(Calibrated(), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


@pytest.fixture
def registered_toy(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", toy)  # the one registry line a new model needs


def test_a_new_model_with_hooks_is_one_registry_line(learnable_betons, registered_toy):
    import json

    raw = tiny(learnable_betons, train__precision="fp32", train__epochs=2)
    raw["model"] = {"name": "toy"}
    raw["optimizer"] = {"name": "roles", "roles": {
        role: {"name": "sgd", "lr": 0.1} for role in ("filters", "norm_biases", "whitening_bias", "head", "other")}}
    raw["scheduler"] = {"name": "linear"}
    parts = build(build_config(raw))
    part = parts.model[0]
    manifest = json.loads((learnable_betons / "manifest.json").read_text())
    assert part.seen == {"folder": parts.cfg.data.folder(), "mean": manifest["mean"], "std": manifest["std"]}
    assert torch.allclose(part.offset, -torch.tensor(manifest["mean"]) / torch.tensor(manifest["std"]))

    by_role = roles(parts.model)
    assert [id(p) for p in by_role["whitening_bias"]] == [id(part.offset)]
    training = start_training(parts)
    assert "whitening_bias" in training.optimizer.roles()

    training.begin_epoch(0, parts.cfg)
    assert part.offset.requires_grad
    training.begin_epoch(1, parts.cfg)
    assert not part.offset.requires_grad and part.seen["epochs"] == [0, 1]


def test_a_param_role_hook_naming_an_unknown_role_is_an_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

        def param_role(self, name, param):
            return "whitening"

    with pytest.raises(ValueError, match="the role 'whitening'"):
        roles(Odd())


def test_modules_without_a_role_hook_keep_the_generic_roles():
    model = toy()
    del model[0]  # no hooks left
    by_role = roles(model)
    assert len(by_role["filters"]) == 1 and len(by_role["norm_biases"]) == 2 and len(by_role["head"]) == 2
    assert not by_role["whitening_bias"] and len(by_role["other"]) == 1  # the conv's bias

