"""Parameter roles (train.optim.roles): every parameter under one role, an optimizer per role, FilterMuon,
and several optimizers behaving as one."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from beton.errors import UserError
from train.hardware import Precision
from train.optim import Schedule
from train.optim.lr_functions import linear, linear_decay
from train.optim.roles import ROLES, FilterMuon, MultiOptimizer, build_role_optimizer, group_lambdas, roles
from train.step import Step, train_step

from .test_airnet import SPEC, _batch, _net


@pytest.mark.parametrize("make", [_net, lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(),
                                                               nn.Linear(4, 4), nn.Linear(4, 2))])
def test_roles_cover_every_parameter_exactly_once(make):
    model = make()
    by_role = roles(model)
    assert tuple(by_role) == ROLES
    ids = [id(p) for params in by_role.values() for p in params]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert all(p.ndim == 4 for p in by_role["filters"])
    if isinstance(model, nn.Sequential):
        assert [id(p) for p in by_role["head"]] == [id(p) for p in model[4].parameters()]
        assert len(by_role["other"]) == 3  # the conv's bias and the first Linear's weight and bias
    else:
        assert by_role["whitening_bias"] == [model.whiten.bias] and by_role["head"] == [model.fc.weight]
        assert by_role["other"] == [model.whiten.weight]
        assert all(id(p) != id(model.whiten.weight) for p in by_role["filters"])


def test_build_role_optimizer_groups_and_errors():
    optimizer = build_role_optimizer(_net(), SPEC)
    assert [type(o).__name__ for o in optimizer.optimizers] == ["FilterMuon", "SGD"]
    assert optimizer.roles() == ["filters", "norm_biases", "whitening_bias", "head"]
    assert optimizer.param_groups[3]["lr"] == 0.2 and "momentum" in optimizer.defaults
    with pytest.raises(UserError, match="no entry for role 'head'"):
        build_role_optimizer(_net(), {k: v for k, v in SPEC.items() if k != "head"})
    with pytest.raises(UserError, match="muon needs matrices"):
        build_role_optimizer(_net(), {**SPEC, "norm_biases": {"name": "muon", "lr": 0.1}})
    with pytest.raises(UserError, match="unknown keys betas"):
        build_role_optimizer(_net(), {**SPEC, "head": {"name": "sgd", "lr": 0.1, "betas": [0.9, 0.99]}})
    with pytest.raises(UserError, match="unknown parameter roles"):
        build_role_optimizer(_net(), {**SPEC, "filter": SPEC["filters"]})


def test_filter_muon_is_torch_muon_on_the_flattened_filter_in_any_layout():
    torch.manual_seed(0)
    weight, grad = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        p = nn.Parameter(weight.clone().contiguous(memory_format=fmt))
        opt = FilterMuon([p], lr=0.1, momentum=0.9, weight_decay=0.01)
        for _ in range(2):
            p.grad = grad.clone().contiguous(memory_format=fmt)
            opt.step()
        results.append(p.detach().clone())
        assert p.is_contiguous(memory_format=fmt)
    flat = nn.Parameter(weight.reshape(6, -1).clone())
    reference = torch.optim.Muon([flat], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(2):
        flat.grad = grad.reshape(6, -1).clone()
        reference.step()
    assert torch.allclose(results[0], flat.detach().view(6, 4, 3, 3), atol=1e-6)
    assert torch.allclose(results[1], results[0], atol=1e-6)
    with pytest.raises(ValueError, match="2 or more dims"):
        FilterMuon([nn.Parameter(torch.zeros(3))])


def _step(model, optimizer, schedule=None, scaler=None, clip=None):
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    return Step(model, optimizer, Precision("fp32", None, False), torch.device("cpu"), scaler, schedule,
                grad_clip=clip)


def test_multioptimizer_trains_in_train_step_with_lambdalr():
    model = _net()
    optimizer = build_role_optimizer(model, SPEC)
    fns = group_lambdas(optimizer, {"whitening_bias": linear(4)}, default=linear(12, warmup=2))
    schedule = Schedule(optimizer, LambdaLR(optimizer, fns), per_batch=True)
    step = _step(model, optimizer, schedule)
    images, labels = _batch()
    filters, norm_bias = model.layer1.conv1.weight.clone(), model.layer1.norm1.bias.clone()
    losses = [train_step(step, images, labels)[0].item() for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model.layer1.conv1.weight, filters) and not torch.equal(model.layer1.norm1.bias, norm_bias)
    lrs = {g["role"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["whitening_bias"] == 0.0 and lrs["head"] == pytest.approx(0.2 * linear_decay(10, 12, 2))
    assert lrs["filters"] == pytest.approx(0.05 * linear_decay(10, 12, 2))


def test_multioptimizer_with_an_enabled_grad_scaler_and_clipping():
    model = _net()
    optimizer = build_role_optimizer(model, SPEC)
    step = _step(model, optimizer, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0), clip=1.0)
    images, labels = _batch()
    losses = [train_step(step, images, labels)[0].item() for _ in range(6)]
    assert losses[-1] < losses[0]


def test_multioptimizer_state_round_trips_through_weights_only_load():
    images, labels = _batch()
    model = _net()
    optimizer = build_role_optimizer(model, SPEC)
    step = _step(model, optimizer)
    for _ in range(2):
        train_step(step, images, labels)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = _net(seed=1)
    twin.load_state_dict(saved["model"])
    twin_optimizer = build_role_optimizer(twin, SPEC)
    twin_optimizer.load_state_dict(saved["optimizer"])
    assert twin_optimizer.roles() == optimizer.roles() and twin_optimizer.param_groups[0]["params"][0] is \
        twin.layer1.conv1.weight
    twin_step = _step(twin, twin_optimizer)
    for _ in range(2):
        train_step(step, images, labels), train_step(twin_step, images, labels)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)  # momentum buffers came back: the same continuation
    with pytest.raises(ValueError, match="saved optimizers"):
        MultiOptimizer([torch.optim.SGD(_net().parameters(), lr=0.1)]).load_state_dict(saved["optimizer"])


def test_a_role_optimizer_is_one_registry_entry(monkeypatch):
    """build_role_optimizer knows the optimizers a role can take only through ROLE_OPTIMIZERS."""
    from train.optim.roles import ROLE_OPTIMIZERS, RoleOptimizer

    monkeypatch.setitem(ROLE_OPTIMIZERS, "adamw", RoleOptimizer(
        {"lr": None, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
        lambda groups: torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("momentum", "nesterov")}
                                          for g in groups], lr=groups[0]["lr"])))
    spec = dict(SPEC, head={"name": "adamw", "lr": 0.01})
    optimizer = build_role_optimizer(_net(), spec)
    assert [type(o).__name__ for o in optimizer.optimizers] == ["FilterMuon", "SGD", "AdamW"]
    assert [g["role"] for g in optimizer.optimizers[2].param_groups] == ["head"]
    with pytest.raises(UserError, match=r"unknown optimizer 'lion'; known: sgd, muon, adamw"):
        build_role_optimizer(_net(), dict(SPEC, head={"name": "lion", "lr": 0.01}))
