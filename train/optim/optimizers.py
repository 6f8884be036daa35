"""The optimizer registry: torch's own optimizers, configured from `OptimizerConfig`; `roles` trains each
parameter role with its own optimizer (`train.optim.roles`).

torch is imported inside the functions that use it: config validation reads `optimizer_names()` from
here, and a config's mistakes are reported before torch loads (seconds).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from beton.errors import UserError

from ..config import OptimizerConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

Params = Iterable  # tensors or param-group dicts, as torch.optim takes them


def _sgd(params: Params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.nesterov and cfg.momentum == 0:
        raise UserError("optimizer.nesterov needs a positive optimizer.momentum")
    import torch

    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _adam(params: Params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _adamw(params: Params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[Params, OptimizerConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}
BY_ROLE = "roles"  # optimizer.name for one optimizer per parameter role (train.optim.roles.ROLE_OPTIMIZERS)


def optimizer_names() -> list[str]:
    """Every name `optimizer.name` takes (what config validation checks against)."""
    return [*OPTIMIZERS, BY_ROLE]


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): every bias and every norm-layer parameter go in the second list.

    Decaying a norm's scale or a bias only shrinks what the next norm undoes anyway, and
    fights the affine the norm is there to learn.
    """
    from .roles import NORM_TYPES

    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if isinstance(module, NORM_TYPES) or name == "bias" else decay).append(param)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    from .roles import build_role_optimizer

    if cfg.name == BY_ROLE:  # one optimizer per parameter role (Muon for the filters, SGD for the rest, ...)
        return build_role_optimizer(model, cfg.roles)
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {cfg.name!r}; known: {', '.join(optimizer_names())}")
    params: Params = model.parameters()
    if cfg.no_decay_norm_bias:
        decay, no_decay = split_decay(model)
        params = [group for group in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0})
                  if group["params"]]
    return OPTIMIZERS[cfg.name](params, cfg)
