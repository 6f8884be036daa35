"""Optimizer parameter groups by role, and several torch optimizers behaving as one.

airbench trains each kind of parameter its own way: the conv filters with Muon (orthogonalised
momentum updates, which suit filters followed by BatchNorm), the BatchNorm biases, the whitening
bias and the head with Nesterov SGD at their own learning rates, and the whitening bias only for
the first few epochs. This module gives the pieces for that:

- `roles(model)`: every parameter under exactly one role (`ROLES`); a module whose parameters have a
  role of their own says so with a `param_role(name, param)` hook (the contract: `train.models`).
- `build_role_optimizer(model, spec)`: one torch optimizer per optimizer name in `spec`, one group
  per role (each group carries its "role"), joined into a `MultiOptimizer`.
- `MultiOptimizer`: a `torch.optim.Optimizer` subclass, so torch's LR schedulers (which check
  `isinstance(optimizer, Optimizer)`; LambdaLR does), `GradScaler` and `train.step.train_step`
  take it as one optimizer. Its `param_groups` are the inner optimizers' own group dicts, so a
  scheduler's LR change reaches them; `group_lambdas` gives LambdaLR one LR function per group, by role.
- `ROLE_OPTIMIZERS`: the optimizers a role can take (`sgd`, and `muon`: `train.optim.muon.FilterMuon`).
- `freeze(params)`: stop training parameters (airbench's whitening bias after a few epochs).
"""
from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from beton.errors import UserError

from ..config import ROLES
from .muon import FilterMuon

# Norm layers, timm's subclasses (BatchNormAct2d, LayerNorm2d..) included (optimizers.split_decay uses them too).
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)


def roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter of `model` (frozen ones too) under exactly one role, in module order.

    A module's `param_role(name, param)` hook decides for its own parameters where it returns a role
    (airnet's whitening conv: whitening_bias for its bias, other for its frozen weight). Otherwise:
    norm_biases: all parameters of norm layers; head: the last nn.Linear's parameters; filters: conv
    weights of dim 4; other: the rest (conv biases, other linears..).
    """
    out: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            hook = getattr(module, "param_role", None)
            role = hook(name, param) if callable(hook) else None
            if role is not None:
                if role not in out:
                    raise ValueError(f"{type(module).__name__}.param_role gave {name!r} the role {role!r}; "
                                     f"roles: {', '.join(ROLES)}")
            elif isinstance(module, NORM_TYPES):
                role = "norm_biases"
            elif module is head:
                role = "head"
            elif isinstance(module, nn.Conv2d) and name == "weight" and param.ndim == 4:
                role = "filters"
            else:
                role = "other"
            out[role].append(param)
    return out


def freeze(params: Iterable[torch.Tensor]) -> None:
    """Stop training `params`: no gradient from now on and none kept, so optimizers skip them."""
    for p in params:
        p.requires_grad_(False)
        p.grad = None


# ---------------------------------------------------------------- several optimizers as one


class MultiOptimizer(torch.optim.Optimizer):
    """Several torch optimizers as one: step, zero_grad, param_groups, state, state_dict.

    `param_groups` is the concatenation of the inner optimizers' group dicts (the same objects), each
    with a "role" key; `defaults` merges the inner defaults (the first optimizer's value wins).
    `state_dict()` is plain data (the inner state dicts), readable with torch.load(weights_only=True).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        if not self.optimizers:
            raise ValueError("MultiOptimizer needs at least one optimizer")
        for i, opt in enumerate(self.optimizers):
            for j, group in enumerate(opt.param_groups):
                group.setdefault("role", f"{type(opt).__name__.lower()}{i}.{j}")
        self._linked = False
        super().__init__([g for opt in self.optimizers for g in opt.param_groups], {})  # checks: each param once
        self._link()

    def _link(self) -> None:
        """Point param_groups, state and defaults at the inner optimizers' (again after a load)."""
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.state = ChainMap(*[opt.state for opt in self.optimizers])
        defaults: dict = {}
        for opt in self.optimizers:
            for key, value in opt.defaults.items():
                defaults.setdefault(key, value)
        self.defaults = defaults
        self._linked = True

    def add_param_group(self, param_group: dict) -> None:
        if self._linked:
            raise TypeError("add a parameter group to one of MultiOptimizer.optimizers, not to the MultiOptimizer")
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict:
        return {"kinds": [type(opt).__name__ for opt in self.optimizers],
                "optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        kinds = [type(opt).__name__ for opt in self.optimizers]
        if list(state_dict.get("kinds", [])) != kinds:
            raise ValueError(f"the saved optimizers are {state_dict.get('kinds')}, these are {kinds}")
        for opt, inner in zip(self.optimizers, state_dict["optimizers"]):
            opt.load_state_dict(inner)
        self._link()

    def roles(self) -> list[str]:
        return [group["role"] for group in self.param_groups]


def group_lambdas(optimizer: torch.optim.Optimizer, by_role: Mapping[str, Callable[[int], float]],
                  default: Callable[[int], float] | None = None) -> list[Callable[[int], float]]:
    """One LR function per param group, picked by the group's role, in the order LambdaLR wants."""
    fns = []
    for group in optimizer.param_groups:
        fn = by_role.get(group.get("role"), default)
        if fn is None:
            raise UserError(f"no LR function for role {group.get('role')!r} (given: {', '.join(by_role)})")
        fns.append(fn)
    return fns


# ---------------------------------------------------------------- build from a spec

@dataclass(frozen=True)
class RoleOptimizer:
    """An optimizer a role can take: the keys its spec entry may set (with their defaults), how to build it
    from its param groups, and any checks of its own beyond the common ones (lr, momentum, ...)."""

    keys: dict
    build: Callable[[list[dict]], torch.optim.Optimizer]
    check: Callable[[str, dict, list], None] = field(default=lambda where, group, params: None)


def _check_muon(where: str, group: dict, params: list) -> None:
    if not isinstance(group["ns_steps"], int) or not 1 <= group["ns_steps"] < 100:
        raise UserError(f"{where}: ns_steps must be an integer in [1, 99], got {group['ns_steps']!r}")
    if not isinstance(group["renormalize"], bool):
        raise UserError(f"{where}: renormalize must be true or false")
    flat = [tuple(p.shape) for p in params if p.ndim < 2]
    if flat:
        raise UserError(f"{where}: muon needs matrices or filters, this role has parameters of shape {flat[0]}")


_COMMON = {"lr": None, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
ROLE_OPTIMIZERS: dict[str, RoleOptimizer] = {
    "sgd": RoleOptimizer(dict(_COMMON), lambda groups: torch.optim.SGD(groups, lr=groups[0]["lr"])),
    "muon": RoleOptimizer(dict(_COMMON, momentum=0.95, nesterov=True, ns_steps=5, renormalize=False),
                          lambda groups: FilterMuon(groups, lr=groups[0]["lr"]), _check_muon),
}


def _group(role: str, entry, params: list) -> tuple[str, dict]:
    """(optimizer name, param group) for one role's spec entry, checked."""
    where = f"optimizer spec for {role!r}"
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: expected a mapping with name and lr, got {entry!r}")
    name = entry.get("name")
    if name not in ROLE_OPTIMIZERS:
        raise UserError(f"{where}: unknown optimizer {name!r}; known: {', '.join(ROLE_OPTIMIZERS)}")
    keys = ROLE_OPTIMIZERS[name].keys
    unknown = sorted(set(entry) - set(keys) - {"name"})
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)} for {name} (known: {', '.join(keys)})")
    group = {**keys, **{k: v for k, v in entry.items() if k != "name"}}
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"{where}: lr must be a positive number, got {lr!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise UserError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0:
        raise UserError(f"{where}: weight_decay must be a non-negative number, got {wd!r}")
    if not isinstance(group["nesterov"], bool) or (group["nesterov"] and momentum == 0):
        raise UserError(f"{where}: nesterov must be true or false, and true needs a positive momentum")
    ROLE_OPTIMIZERS[name].check(where, group, params)
    group.update(lr=float(lr), momentum=float(momentum), weight_decay=float(wd), params=params, role=role)
    return name, group


def build_role_optimizer(model: nn.Module, spec: Mapping[str, Mapping]) -> MultiOptimizer:
    """A MultiOptimizer training each role of `model` as `spec` says.

    spec: role -> {name: a ROLE_OPTIMIZERS name (sgd, muon), lr, momentum, nesterov, weight_decay} (muon
    also ns_steps, renormalize). Roles sharing an optimizer name share one torch optimizer (a group each). Only
    parameters that require grad are trained; a role with such parameters but no entry is an error,
    an entry for a role without any is ignored. weight_decay means what each optimizer means by it:
    coupled L2 for SGD, decoupled (p *= 1 - lr * wd) for Muon.
    """
    unknown = sorted(set(spec) - set(ROLES))
    if unknown:
        raise UserError(f"unknown parameter roles {', '.join(unknown)}; known: {', '.join(ROLES)}")
    groups: dict[str, list[dict]] = {}
    for role, params in roles(model).items():
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        if role not in spec:
            raise UserError(f"the optimizer spec has no entry for role {role!r} "
                            f"({sum(p.numel() for p in params):,} trainable parameters)")
        name, group = _group(role, spec[role], params)
        groups.setdefault(name, []).append(group)
    if not groups:
        raise UserError("the model has no trainable parameters")
    return MultiOptimizer([ROLE_OPTIMIZERS[name].build(named_groups) for name, named_groups in groups.items()])
