"""The model registry: one file per model family, one line per model in `MODELS`, plus `timm:<name>`.

Families: `resnet` (CIFAR ResNet18/34), `custom_resnet` (the course assignment's), `fastnet` (what `make run`
trains), `airnet` (the speed recipe's, with its patch-whitening layer), `timm_models` (`timm:<name>`); `norms`
holds the norm layers every family takes by name (`model.norm`).

A registry entry is `fn(num_classes, norm, **options)` -> nn.Module; `model.options` are its keywords. The
built-in models are written for 32x32 inputs (3x3 stride-1 stems, no ImageNet max-pool). Attribute names
(`stem`/`prep`, `layer1`.., `pool`, `fc`) are part of the contract: analysis picks Grad-CAM layers by name.

Hooks. A model that needs the data or trains some parameters its own way says so itself: any of its modules
(the model included) may define these methods, and the generic code calls every one it finds, in module order
(`module_hooks`), without knowing the model:

- `fit_to_data(data, mean, std)`: called once by `train.parts.build`, after the model is built and before it
  moves to the device; `data` is the run's DataConfig (read the training split from it, never the validation
  images), `mean`/`std` the manifest's per-channel statistics on the 0-255 scale. airnet's whitening conv sets
  its filters from the training images' 2x2 patches here.
- `param_role(name, param)`: the role (one of `train.optim.roles.ROLES`) of the module's own parameter `name`,
  or None for the generic rules (`train.optim.roles.roles`). The whitening conv's bias is "whitening_bias".
- `begin_epoch(epoch, train_cfg)`: called before epoch `epoch` (counting from 0) trains, on every rank, with
  the run's TrainConfig; it may freeze parameters (requires_grad off), and the loop re-wraps DDP when the
  trainable set changes (`train.state.Training.begin_epoch`). The whitening conv's bias stops training after
  `train.whitening_bias_epochs`.

So a new model of either kind is one file here plus one line in `MODELS`.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Union

import torch
from torch import nn

from beton.errors import UserError

from ..config import ModelConfig
from .airnet import airnet
from .custom_resnet import custom_resnet
from .fastnet import fastnet
from .norms import NORMS
from .resnet import resnet18, resnet34
from .timm_models import TIMM_PREFIX, create_timm_model

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "custom_resnet": custom_resnet,
    "fastnet": fastnet,
    "airnet": airnet,
}

__all__ = ["MODELS", "NORMS", "TIMM_PREFIX", "count_parameters", "create_model", "module_hooks",
           "registered_counts"]


def module_hooks(model: nn.Module, hook: str) -> list[Callable]:
    """The bound `hook` methods of `model`'s modules (itself included), in module order: see the hooks above."""
    return [method for module in model.modules() if callable(method := getattr(module, hook, None))]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create_model(cfg: Union[ModelConfig, str], num_classes: int = 10, **fields) -> nn.Module:
    """Build the model a config names; `cfg.num_classes` wins over `num_classes` when set.

    `cfg` may also be a bare name, with ModelConfig fields as keywords:
    `create_model("resnet18", 100, norm="layer")`.
    """
    cfg = ModelConfig(name=cfg, **fields) if isinstance(cfg, str) else dataclasses.replace(cfg, **fields)
    classes = cfg.num_classes if cfg.num_classes is not None else num_classes
    if cfg.name.startswith(TIMM_PREFIX):
        return create_timm_model(cfg, classes)
    if cfg.name not in MODELS:
        known = ", ".join(MODELS)
        raise UserError(f"unknown model {cfg.name!r}; known: {known}, {TIMM_PREFIX}<any timm model>")
    for flag in ("pretrained", "adapt_stem"):
        if getattr(cfg, flag):
            raise UserError(f"model.{flag} applies to timm models only, not {cfg.name}")
    fn = MODELS[cfg.name]
    if cfg.strides is not None and "strides" not in inspect.signature(fn).parameters:
        takes = ", ".join(n for n, f in MODELS.items() if "strides" in inspect.signature(f).parameters)
        raise UserError(f"model.strides applies to {takes}, not {cfg.name}")
    options = {**cfg.options, **({"strides": cfg.strides} if cfg.strides is not None else {})}
    try:
        return fn(num_classes=classes, norm=cfg.norm, **options)
    except TypeError as e:  # an option the model does not take
        raise UserError(f"model.options for {cfg.name}: {e}") from e


def registered_counts(num_classes: int = 10) -> dict[str, int]:
    """Parameter count of every built-in model with batch norm; built on the meta device, so no memory."""
    with torch.device("meta"):
        return {name: count_parameters(build(num_classes, "batch")) for name, build in MODELS.items()}
