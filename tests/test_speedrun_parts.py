"""The airbench-style building blocks: AirNet and its whitening, role optimizers, averaging, TTA, LR functions."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from beton.errors import UserError
from train.airnet import airnet, init_whitening, patch_covariance
from train.averaging import EMA, Lookahead
from train.hardware import Precision
from train.lr_functions import linear, linear_decay
from train.optim import Schedule
from train.param_groups import (
    ROLES,
    FilterMuon,
    MultiOptimizer,
    build_role_optimizer,
    freeze,
    group_lambdas,
    roles,
)
from train.step import Step, train_step
from train.tta import least_confident_only, translate, tta_logits

WIDTHS = (8, 16, 16)
SPEC = {"filters": {"name": "muon", "lr": 0.05, "momentum": 0.6, "nesterov": True, "renormalize": True},
        "norm_biases": {"name": "sgd", "lr": 0.05, "momentum": 0.85, "nesterov": True, "weight_decay": 1e-4},
        "whitening_bias": {"name": "sgd", "lr": 0.05, "momentum": 0.85, "nesterov": True},
        "head": {"name": "sgd", "lr": 0.2, "momentum": 0.85, "nesterov": True}}


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return airnet(10, "batch", widths=WIDTHS, **kw)


def _correlated_images(n=48, size=16, seed=0) -> np.ndarray:
    """uint8 N x H x W x 3 with neighbouring pixels and channels correlated, plus independent noise."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, size + 1, size + 1, generator=g)
    smooth = noise[..., :-1, :-1] + 0.7 * noise[..., 1:, :-1] + 0.7 * noise[..., :-1, 1:]
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 1.0, 0.8], [0.0, 0.0, 1.0]])
    x = torch.einsum("oc,nchw->nohw", mix, smooth) + 0.4 * torch.randn(n, 3, size, size, generator=g)
    x = (x * 30 + 128).clamp(0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 10, (n,), generator=g)


# ---------------------------------------------------------------- AirNet


def test_whitening_makes_patch_covariance_identity():
    images = _correlated_images()
    mean, std = images.reshape(-1, 3).mean(0), images.reshape(-1, 3).std(0)
    x = (torch.as_tensor(images).permute(0, 3, 1, 2).float() - torch.as_tensor(mean).view(1, 3, 1, 1).float()) \
        / torch.as_tensor(std).view(1, 3, 1, 1).float()
    _, before = patch_covariance(x, 2)
    assert (before - torch.eye(12, dtype=before.dtype)).abs().max() > 0.5  # the data really is correlated
    model = _net()
    init_whitening(model, images, mean, std)
    with torch.no_grad():
        out = model.whiten(x).double()  # N x 24 x 15 x 15
    first, second = out[:, :12], out[:, 12:]
    assert torch.allclose(second, -first)  # the +/- copies
    flat = first.permute(0, 2, 3, 1).reshape(-1, 12)
    assert flat.mean(0).abs().max() < 1e-4  # the bias centres the output
    cov = torch.cov(flat.T, correction=0)
    assert (cov - torch.eye(12, dtype=cov.dtype)).abs().max() < 0.03


def test_init_whitening_rejects_float_images():
    with pytest.raises(UserError, match="uint8"):
        init_whitening(_net(), np.zeros((2, 8, 8, 3), np.float32), [0] * 3, [1] * 3)


def test_whitening_weight_frozen_bias_trains():
    model = _net()
    images, labels = _batch()
    F.cross_entropy(model(images), labels).backward()
    assert not model.whiten.weight.requires_grad and model.whiten.weight.grad is None
    assert model.whiten.bias.grad is not None and model.whiten.bias.grad.abs().sum() > 0
    weight, bias = model.whiten.weight.clone(), model.whiten.bias.clone()
    optimizer = build_role_optimizer(model, SPEC)
    optimizer.step()
    assert torch.equal(model.whiten.weight, weight) and not torch.equal(model.whiten.bias, bias)
    freeze([model.whiten.bias])  # airbench stops training it after a few epochs
    assert model.whiten.bias.grad is None and not model.whiten.bias.requires_grad
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    frozen = model.whiten.bias.clone()
    optimizer.step()
    assert torch.equal(model.whiten.bias, frozen)


def test_airnet_shape_options_and_registry_convention():
    model = airnet(10, "batch", widths=WIDTHS).eval()  # positional (num_classes, norm), as create_model calls it
    assert model(_batch()[0]).shape == (8, 10)
    assert model.fc.bias is None and not model.layer1.norm1.weight.requires_grad
    assert model.layer1.norm1.momentum == 0.4 and model.layer1.norm1.eps == 1e-12
    w = model.layer2.conv2.weight  # 16 -> 16: Dirac init makes it the identity
    assert torch.equal(F.conv2d(torch.ones(1, 16, 5, 5), w, padding=1), torch.ones(1, 16, 5, 5))
    assert model.layer1.conv1.weight[:, :, 1, 1][:WIDTHS[0], :].diagonal().eq(1).all()  # identity on the first 8
    assert model.logit_scale == 1 / WIDTHS[-1]
    assert _net(bn_frozen_scale=False).layer1.norm1.weight.requires_grad
    layer = airnet(10, "layer", widths=WIDTHS)  # another norm replaces the recipe's BatchNorm, for comparisons
    assert isinstance(layer.layer1.norm1, torch.nn.GroupNorm) and layer.layer1.norm1.num_groups == 1
    with pytest.raises(UserError, match="unknown norm"):
        airnet(10, "weird", widths=WIDTHS)


# ---------------------------------------------------------------- roles and optimizers


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


# ---------------------------------------------------------------- averaging


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_equals_the_hand_computed_average():
    model = _Tiny()
    ema = EMA(model, decay=0.5, every=2)
    values = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # the model's weights before steps 1..6
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            model.w.fill_(v), model.running.fill_(-v), model.count.fill_(step)
        ema.update(step)
    expected = ((0 * 0.5 + 2 * 0.5) * 0.5 + 8 * 0.5) * 0.5 + 32 * 0.5  # steps 2, 4, 6 only
    assert ema.updates == 3 and torch.allclose(ema.average["w"], torch.full((2,), expected))
    assert torch.allclose(ema.average["running"], torch.full((2,), -expected)) and ema.average["count"] == 6
    with ema.averaged() as averaged:
        assert torch.allclose(averaged.w, torch.full((2,), expected))
    assert torch.equal(model.w, torch.full((2,), 32.0))  # its own weights are back
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other = EMA(_Tiny(), decay=0.9)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.decay == 0.5 and torch.equal(other.average["w"], ema.average["w"])


def test_lookahead_resets_the_model_to_the_average():
    model = _Tiny()
    lookahead = Lookahead(model, decay=0.75)
    with torch.no_grad():
        model.w.fill_(4.0)
    lookahead.update(1)
    assert torch.equal(model.w, torch.full((2,), 1.0)) and torch.equal(lookahead.average["w"], model.w)


# ---------------------------------------------------------------- TTA


class _Recorder(nn.Module):
    """A model that is not mirror-symmetric and records the memory format of its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.formats = []

    def forward(self, x):
        self.formats.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.conv(x).flatten(2).max(2).values * torch.linspace(1, 2, 5)


def test_tta_flip_is_the_mean_of_both_passes_and_flip_invariant():
    model = _Recorder()
    images = _batch()[0]
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1).contiguous(memory_format=torch.channels_last))
    model.formats.clear()
    out = tta_logits(model, images, "flip")
    assert torch.allclose(out, 0.5 * plain + 0.5 * mirrored, atol=1e-6)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # so the invariance below is not trivial
    assert torch.allclose(tta_logits(model, images.flip(-1).contiguous(memory_format=torch.channels_last), "flip"),
                          out, atol=1e-6)
    assert all(model.formats)  # every view kept channels_last
    assert torch.equal(tta_logits(model, images, "none"), plain)


def test_tta_flip_translate_weights_and_translation():
    model = _Recorder()
    images = _batch()[0]
    moved = translate(images, 1, 1)
    assert torch.equal(moved[..., 1:, 1:], images[..., :-1, :-1])  # one pixel down-right
    assert torch.equal(moved[..., 0, 1:], images[..., 1, :-1])  # filled by reflection
    flip = lambda x: tta_logits(model, x, "flip")
    expected = 0.5 * flip(images) + 0.25 * flip(translate(images, 1, 1)) + 0.25 * flip(translate(images, -1, -1))
    assert torch.allclose(tta_logits(model, images, "flip_translate"), expected, atol=1e-6)
    with pytest.raises(UserError, match="unknown test-time augmentation"):
        tta_logits(model, images, "rotate")


def test_least_confident_only_changes_just_the_least_confident():
    model = _Recorder()
    images = _batch()[0]
    plain, full = tta_logits(model, images, "none"), tta_logits(model, images, "flip")
    assert torch.equal(least_confident_only(model, images, "flip", 0.0), plain)
    assert torch.allclose(least_confident_only(model, images, "flip", 1.0), full, atol=1e-6)
    least = plain.softmax(1).amax(1).argsort()[:3]
    out = least_confident_only(model, images, "flip", 0.3)  # ceil(2.4) = 3 images
    changed = (out != plain).any(1).nonzero().flatten()
    assert set(changed.tolist()) == set(least.tolist())
    assert torch.allclose(out[least], full[least], atol=1e-6)


# ---------------------------------------------------------------- LR functions


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
