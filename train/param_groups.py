"""Optimizer parameter groups by role, and several torch optimizers behaving as one.

airbench trains each kind of parameter its own way: the conv filters with Muon (orthogonalised
momentum updates, which suit filters followed by BatchNorm), the BatchNorm biases, the whitening
bias and the head with Nesterov SGD at their own learning rates, and the whitening bias only for
the first few epochs. This module gives the pieces for that:

- `roles(model)`: every parameter under exactly one role (`ROLES`).
- `build_role_optimizer(model, spec)`: one torch optimizer per optimizer name in `spec`, one group
  per role (each group carries its "role"), joined into a `MultiOptimizer`.
- `MultiOptimizer`: a `torch.optim.Optimizer` subclass, so torch's LR schedulers (which check
  `isinstance(optimizer, Optimizer)`; LambdaLR does), `GradScaler` and `train.step.train_step`
  take it as one optimizer. Its `param_groups` are the inner optimizers' own group dicts, so a
  scheduler's LR change reaches them; `group_lambdas` gives LambdaLR one LR function per group, by role.
- `FilterMuon`: torch's `Muon` for conv filters. torch's Muon refuses anything but 2-D parameters
  (in its constructor and again in its step), so FilterMuon registers the N-D filters itself and,
  for each step, hands Muon each filter and gradient as an (out, in * kh * kw) matrix, the view
  airbench orthogonalises. Where the filter's memory is not laid out that way (channels_last), the
  matrix is a copy and is written back after the step. Optional `renormalize` (airbench): each
  filter is rescaled to norm sqrt(out channels) before its update, which BatchNorm makes harmless
  and which keeps the effective step size from shrinking as the filters grow.
- `freeze(params)`: stop training parameters (airbench's whitening bias after a few epochs).
"""
from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from beton.errors import UserError

from .airnet import WhiteningConv
from .config import ROLES

MUON_TORCH = "2.9"  # the first torch release with torch.optim.Muon, which FilterMuon subclasses
if not hasattr(torch.optim, "Muon"):
    raise UserError(f"fastcifar needs torch>={MUON_TORCH} (torch.optim.Muon); this environment has torch "
                    f"{torch.__version__}: pip install 'torch>={MUON_TORCH}'")

# Norm layers, timm's subclasses (BatchNormAct2d, LayerNorm2d..) included (optim.split_decay uses them too).
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)



def roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter of `model` (frozen ones too) under exactly one role, in module order.

    filters: conv weights of dim 4, the whitening conv's excepted; norm_biases: all parameters of
    norm layers; whitening_bias: the whitening conv's bias; head: the last nn.Linear's parameters;
    other: the rest (the frozen whitening weight, conv biases, other linears..).
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
            if isinstance(module, WhiteningConv):
                role = "whitening_bias" if name == "bias" else "other"
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


# ---------------------------------------------------------------- Muon for filters


class FilterMuon(torch.optim.Muon):
    """torch.optim.Muon over parameters of 2 or more dims, each seen as (dim 0, the rest) matrix."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, renormalize: bool = False, **muon_options):
        # Muon checks its hyperparameters, then refuses non-2-D parameters: let it check them on a placeholder
        probe = torch.optim.Muon([torch.zeros(1, 1)], lr=lr, weight_decay=weight_decay, momentum=momentum,
                                 nesterov=nesterov, ns_steps=ns_steps, **muon_options)
        torch.optim.Optimizer.__init__(self, params, dict(probe.defaults, renormalize=bool(renormalize)))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"FilterMuon needs parameters of 2 or more dims, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        swapped = []
        try:
            for group in self.param_groups:
                real = group["params"]
                mats = []
                for p in real:
                    if group["renormalize"] and p.grad is not None:
                        p.mul_(math.sqrt(p.shape[0]) / p.norm().clamp(min=1e-12))
                    m = p.detach().reshape(p.shape[0], -1)  # a view where the layout allows, else a copy
                    if p.grad is not None:
                        m.grad = p.grad.reshape(m.shape)
                    if p in self.state:
                        self.state[m] = self.state.pop(p)
                    mats.append(m)
                group["params"] = mats
                swapped.append((group, real, mats))
            super().step()
        finally:
            for group, real, mats in swapped:
                group["params"] = real
                for p, m in zip(real, mats):
                    if m in self.state:
                        self.state[p] = self.state.pop(m)
                    if m.data_ptr() != p.data_ptr():
                        p.copy_(m.view(p.shape))
                    m.grad = None
        return loss


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

_COMMON = {"lr": None, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
_KEYS = {"sgd": dict(_COMMON),
         "muon": dict(_COMMON, momentum=0.95, nesterov=True, ns_steps=5, renormalize=False)}


def _group(role: str, entry, params: list) -> tuple[str, dict]:
    """(optimizer name, param group) for one role's spec entry, checked."""
    where = f"optimizer spec for {role!r}"
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: expected a mapping with name and lr, got {entry!r}")
    name = entry.get("name")
    if name not in _KEYS:
        raise UserError(f"{where}: unknown optimizer {name!r}; known: {', '.join(_KEYS)}")
    unknown = sorted(set(entry) - set(_KEYS[name]) - {"name"})
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)} for {name} (known: {', '.join(_KEYS[name])})")
    group = {**_KEYS[name], **{k: v for k, v in entry.items() if k != "name"}}
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"{where}: lr must be a positive number, got {lr!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise UserError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0:
        raise UserError(f"{where}: weight_decay must be a non-negative number, got {wd!r}")
    if not isinstance(group["nesterov"], bool) or (group["nesterov"] and momentum == 0):
        raise UserError(f"{where}: nesterov must be true or false, and true needs a positive momentum")
    if name == "muon":
        if not isinstance(group["ns_steps"], int) or not 1 <= group["ns_steps"] < 100:
            raise UserError(f"{where}: ns_steps must be an integer in [1, 99], got {group['ns_steps']!r}")
        if not isinstance(group["renormalize"], bool):
            raise UserError(f"{where}: renormalize must be true or false")
        flat = [tuple(p.shape) for p in params if p.ndim < 2]
        if flat:
            raise UserError(f"{where}: muon needs matrices or filters, this role has parameters of shape {flat[0]}")
    group.update(lr=float(lr), momentum=float(momentum), weight_decay=float(wd), params=params, role=role)
    return name, group


def build_role_optimizer(model: nn.Module, spec: Mapping[str, Mapping]) -> MultiOptimizer:
    """A MultiOptimizer training each role of `model` as `spec` says.

    spec: role -> {name: muon | sgd, lr, momentum, nesterov, weight_decay} (muon also ns_steps,
    renormalize). Roles sharing an optimizer name share one torch optimizer (a group each). Only
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
    optimizers = []
    for name, named_groups in groups.items():
        if name == "sgd":
            optimizers.append(torch.optim.SGD(named_groups, lr=named_groups[0]["lr"]))
        else:
            optimizers.append(FilterMuon(named_groups, lr=named_groups[0]["lr"]))
    return MultiOptimizer(optimizers)
