"""AirNet: a small CIFAR net built for speed, after airbench (Jordan, arXiv 2404.00498).

Why it trains fast:
- The first layer is a frozen 2x2 patch-whitening conv (stride 1, no padding): its filters are
  the eigenvectors of the covariance of 2x2 patches of the training images, scaled by
  1/sqrt(eigenvalue + eps), so its output is decorrelated with unit variance from the first step.
  Each filter comes twice, +v and -v (3 * 2 * 2 = 12 eigenvectors -> 24 channels), so the GELU
  that follows drops no information (x = GELU(x) - GELU(-x)). Only its bias trains.
- Then blocks of conv3x3 -> MaxPool2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU
  (31 -> 15 -> 7 -> 3 pixels), global max pool, a linear head without bias, and a fixed logit scale.
- Convs start as identity on their first in-channels (Dirac init): at step 0 every block passes
  its input through, so the signal reaches the head undistorted.
- BatchNorm runs with a large momentum (fast-moving statistics for short runs), a tiny eps, and
  (by default) a frozen scale: only its bias trains, the conv filters carry the scale.

Our variant of the whitening init: the covariance is centred, and the bias starts at -W mean,
so the whitened patches have zero mean as well as identity covariance (airbench uses the
uncentred second moment and a random bias; on normalised images the two are close).

Attribute names keep the registry's contract (`stem`, `layer1`.., `pool`, `fc`): Grad-CAM picks
its layer among the direct children. `model.whiten` is the whitening conv inside `stem`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from beton.errors import UserError

from ..optim.roles import freeze
from .norms import norm_layer


WHITENING_IMAGES = 5000  # training images whose 2x2 patches set a whitening conv (airbench's number)
# the activation after the whitening conv and each norm (airbench: GELU; hiverge/cifar10-speedrun: SiLU); any
# odd-symmetric-plus-identity one keeps the +v/-v whitening lossless: f(x) - f(-x) = x for both
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}


def whitening_images(data, count: int = WHITENING_IMAGES) -> np.ndarray:
    """The first `count` training images (never validation ones), uint8 N x 32 x 32 x 3."""
    from fastloader.loaders import read_split, train_val_indices  # FFCV loads only where a model needs the data

    images, _ = read_split(data.folder(), "train")
    train_indices, _ = train_val_indices(len(images), data)
    chosen = np.arange(len(images)) if train_indices is None else train_indices
    return images[chosen[:count]]


class WhiteningConv(nn.Conv2d):
    """The patch-whitening conv: weight frozen (set from the data), bias trainable for the first epochs.

    Its three hooks (the contract is in `train.models`) make it a model part the generic code needs no
    special case for: its filters come from the training images, its bias has a role of its own, and
    the bias stops training after `train.whitening_bias_epochs`.
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, images: int = WHITENING_IMAGES):
        super().__init__(in_channels, 2 * in_channels * kernel_size ** 2, kernel_size, padding=0, bias=True)
        self.weight.requires_grad_(False)
        self.images = images

    def fit_to_data(self, data, mean: Sequence[float], std: Sequence[float]) -> None:
        """The hook `train.parts.build` calls: filters and bias from the run's first `images` training images."""
        fit_whitening(self, whitening_images(data, self.images), mean, std)

    def param_role(self, name: str, param: nn.Parameter) -> str:
        return "whitening_bias" if name == "bias" else "other"

    def begin_epoch(self, epoch: int, train_cfg) -> None:
        """Frozen from epoch `train.whitening_bias_epochs` on (airbench trains it for the first 3 only)."""
        n = train_cfg.whitening_bias_epochs
        if n is not None and epoch >= n:
            freeze([self.bias])


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with airbench's knobs; `momentum` is torch's (the weight of the new batch)."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12, frozen_scale: bool = True):
        super().__init__(channels, eps=eps, momentum=momentum)
        if frozen_scale:
            self.weight.requires_grad_(False)  # stays 1: the conv before it sets the scale


class Conv(nn.Conv2d):
    """3x3 'same' conv without bias; Dirac init makes it identity on its first in-channels."""

    def __init__(self, cin: int, cout: int, dirac: bool = True):
        self.dirac = dirac
        super().__init__(cin, cout, 3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.dirac:
            with torch.no_grad():
                w = self.weight
                nn.init.dirac_(w[:min(w.size(0), w.size(1))])


class ConvGroup(nn.Sequential):
    """conv3x3 -> MaxPool2 -> BN -> GELU -> conv3x3 -> BN -> GELU (`activation`: another one for GELU)."""

    def __init__(self, cin: int, cout: int, bn: dict, dirac: bool, norm_layer=None, activation=nn.GELU):
        norm = norm_layer or (lambda c: BatchNorm(c, **bn))
        super().__init__(OrderedDict(conv1=Conv(cin, cout, dirac), pool=nn.MaxPool2d(2), norm1=norm(cout),
                                     act1=activation(), conv2=Conv(cout, cout, dirac), norm2=norm(cout),
                                     act2=activation()))


class AirNet(nn.Module):
    """Whitening stem, len(widths) conv groups, global max pool, bias-free linear head times `logit_scale`."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 256, 256), whiten_kernel: int = 2,
                 bn_momentum: float = 0.4, bn_eps: float = 1e-12, bn_frozen_scale: bool = True, dirac: bool = True,
                 logit_scale: float | None = None, norm_layer=None, activation: str = "gelu",
                 whitening_images: int = WHITENING_IMAGES):
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise UserError(f"airnet widths must be positive channel counts, got {tuple(widths)!r}")
        if not 0 < bn_momentum <= 1 or bn_eps <= 0:
            raise UserError(f"airnet: bn_momentum must be in (0, 1] and bn_eps positive, got {bn_momentum}, {bn_eps}")
        if activation not in ACTIVATIONS:
            raise UserError(f"airnet: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        if isinstance(whitening_images, bool) or not isinstance(whitening_images, int) or whitening_images < 1:
            raise UserError(f"airnet: whitening_images must be a positive number of images, got {whitening_images!r}")
        act = ACTIVATIONS[activation]
        self.stem = nn.Sequential(OrderedDict(whiten=WhiteningConv(3, whiten_kernel, whitening_images), act=act()))
        bn = {"momentum": bn_momentum, "eps": bn_eps, "frozen_scale": bn_frozen_scale}
        cin = self.stem.whiten.out_channels
        self.depth = len(widths)
        for i, width in enumerate(widths, start=1):
            setattr(self, f"layer{i}", ConvGroup(cin, int(width), bn, dirac, norm_layer, act))
            cin = int(width)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(cin, num_classes, bias=False)
        with torch.no_grad():
            self.fc.weight.div_(self.fc.weight.std())  # unit-std head; the logit scale sets the output size
        # airbench divides the logits by the head's width: a fixed temperature, not a parameter
        self.logit_scale = float(logit_scale) if logit_scale is not None else 1.0 / cin

    @property
    def whiten(self) -> WhiteningConv:
        return self.stem.whiten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale


def airnet(num_classes: int = 10, norm: str = "batch", widths: Sequence[int] = (64, 256, 256), **options) -> AirNet:
    """The registry's entry point (`fn(num_classes, norm)`); options are AirNet's keywords. norm "batch" is the
    recipe's BatchNorm (bn_* options); another norm (layer, group, instance) replaces it, for comparisons."""
    if norm != "batch":
        options["norm_layer"] = norm_layer(norm)
    return AirNet(num_classes, widths, **options)


def _whitening_conv(model: nn.Module) -> WhiteningConv:
    found = [m for m in model.modules() if isinstance(m, WhiteningConv)]
    if len(found) != 1:
        raise UserError(f"init_whitening needs a model with one whitening conv, this one has {len(found)}")
    return found[0]


@torch.no_grad()
def patch_covariance(images: torch.Tensor, kernel: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) in float64 of the kernel x kernel patches (stride 1, no padding) of float NCHW
    `images`, each patch flattened as (channel, row, column), the layout of a conv weight."""
    total, count = None, 0
    outer = None
    for part in images.split(chunk):
        patches = F.unfold(part.float(), kernel).transpose(1, 2).reshape(-1, part.shape[1] * kernel ** 2).double()
        total = patches.sum(0) if total is None else total + patches.sum(0)
        outer = patches.T @ patches if outer is None else outer + patches.T @ patches
        count += len(patches)
    mean = total / count
    return mean, outer / count - torch.outer(mean, mean)


def init_whitening(model: nn.Module, images_uint8_NHWC, mean: Sequence[float], std: Sequence[float],
                   eps: float = 5e-4) -> None:
    """Set the one whitening conv of `model` from training images (`fit_whitening`)."""
    fit_whitening(_whitening_conv(model), images_uint8_NHWC, mean, std, eps)


@torch.no_grad()
def fit_whitening(conv: WhiteningConv, images_uint8_NHWC, mean: Sequence[float], std: Sequence[float],
                  eps: float = 5e-4) -> None:
    """Set whitening conv `conv` from training images (uint8 N x H x W x 3, numpy or tensor).

    The images are normalised as the loaders do ((x - mean) / std, mean/std on the 0-255 scale),
    then the covariance C = V diag(l) V^T of their patches gives the filters +-V^T / sqrt(l + eps)
    and the bias -+(filters . patch mean). `eps` keeps near-zero eigenvalues from blowing up.
    """
    images = torch.as_tensor(np.asarray(images_uint8_NHWC)) if not torch.is_tensor(images_uint8_NHWC) \
        else images_uint8_NHWC
    k, c = conv.kernel_size[0], conv.in_channels
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != c:
        raise UserError(f"init_whitening expects uint8 images N x H x W x {c}, got {images.dtype} "
                        f"{tuple(images.shape)}")
    if len(images) == 0 or min(images.shape[1:3]) < k:
        raise UserError(f"init_whitening needs at least one image of at least {k}x{k} pixels")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    x = (images.permute(0, 3, 1, 2).float() - mean_t) / std_t
    patch_mean, cov = patch_covariance(x, k)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps).unsqueeze(1)  # rows: one filter each
    bias = -filters @ patch_mean
    weight = torch.cat((filters, -filters)).view(conv.out_channels, c, k, k)
    conv.weight.copy_(weight.to(conv.weight.dtype))  # copy_: keeps the weight's device and memory format
    conv.bias.copy_(torch.cat((bias, -bias)).to(conv.bias.dtype))
