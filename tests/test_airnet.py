"""AirNet (train.models.airnet): the patch-whitening conv set from the images, its frozen weight and
trainable bias, and the model's shape options."""
from __future__ import annotations

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from beton.errors import UserError
from train.models.airnet import airnet, init_whitening, patch_covariance
from train.optim.roles import build_role_optimizer, freeze


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


def test_activation_option_swaps_every_gelu_and_keeps_the_parameters():
    """hiverge/cifar10-speedrun's SiLU for airbench's GELU: `model.options.activation: silu`."""
    silu, gelu = _net(activation="silu"), _net()
    kinds = lambda net: {type(m).__name__ for m in net.modules() if isinstance(m, (torch.nn.GELU, torch.nn.SiLU))}  # noqa: E731
    assert kinds(silu) == {"SiLU"} and kinds(gelu) == {"GELU"}
    assert sum(isinstance(m, torch.nn.SiLU) for m in silu.modules()) == 1 + 2 * len(WIDTHS)
    assert [p.shape for p in silu.parameters()] == [p.shape for p in gelu.parameters()]
    x = torch.randn(2, 3, 32, 32)
    assert silu(x).shape == (2, 10) and not torch.equal(silu(x), gelu(x))
    with pytest.raises(UserError, match=r"^airnet: unknown activation 'relu'; known: gelu, silu$"):
        _net(activation="relu")


def test_whitening_images_option_fits_the_conv_on_that_many_first_training_images(learnable_betons):
    """hiverge/cifar10-speedrun fits the whitening on fewer images than airbench's 5,000."""
    import json

    from fastloader.config import DataConfig
    from fastloader.loaders import read_split
    from train.models.airnet import fit_whitening, WhiteningConv

    data = DataConfig(beton_dir=str(learnable_betons))
    stats = json.loads((learnable_betons / "manifest.json").read_text())
    net = _net(whitening_images=50)
    net.whiten.fit_to_data(data, stats["mean"], stats["std"])
    expected = WhiteningConv(3, 2)
    fit_whitening(expected, read_split(data.folder(), "train")[0][:50], stats["mean"], stats["std"])
    assert torch.equal(net.whiten.weight, expected.weight) and torch.equal(net.whiten.bias, expected.bias)
    every = _net()
    every.whiten.fit_to_data(data, stats["mean"], stats["std"])  # the default: the first 5,000 (here: all 1,000)
    assert not torch.equal(every.whiten.weight, net.whiten.weight)
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="whitening_images must be a positive number"):
            _net(whitening_images=bad)
