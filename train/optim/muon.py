"""`FilterMuon`: torch's `Muon` for conv filters.

torch's Muon refuses anything but 2-D parameters (in its constructor and again in its step), so FilterMuon
registers the N-D filters itself and, for each step, hands Muon each filter and gradient as an
(out, in * kh * kw) matrix, the view airbench orthogonalises. Where the filter's memory is not laid out that
way (channels_last), the matrix is a copy and is written back after the step. Optional `renormalize`
(airbench): each filter is rescaled to norm sqrt(out channels) before its update, which BatchNorm makes
harmless and which keeps the effective step size from shrinking as the filters grow.
"""
from __future__ import annotations

import math

import torch

from beton.errors import UserError

MUON_TORCH = "2.9"  # the first torch release with torch.optim.Muon, which FilterMuon subclasses
if not hasattr(torch.optim, "Muon"):
    raise UserError(f"fastcifar needs torch>={MUON_TORCH} (torch.optim.Muon); this environment has torch "
                    f"{torch.__version__}: pip install 'torch>={MUON_TORCH}'")


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
