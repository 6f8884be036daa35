"""The training step (train.step): clipping by value on every step path."""
from __future__ import annotations

import pytest
import torch

from train.hardware import Precision
from train.step import Step, train_step


def _grads_after_step(clip_value, clip_norm, scaled):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = Precision("test", None, scaled)  # scaled: a live GradScaler on the CPU
    step = Step(model, optimizer, precision, torch.device("cpu"), precision.scaler(torch.device("cpu")),
                grad_clip=clip_norm, grad_clip_value=clip_value)
    x, y = torch.randn(32, 8) * 10, torch.randint(0, 4, (32,))
    train_step(step, x, y)
    return {k: start[k] - v for k, v in model.state_dict().items()}, start, (x, y)  # lr 1: the applied gradient


@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_by_value_matches_torch_on_every_step_path(scaled):
    applied, start, (x, y) = _grads_after_step(0.01, None, scaled)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference.load_state_dict(start)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    grads = {name: p.grad.clamp(-0.01, 0.01) for name, p in reference.named_parameters()}
    assert max(g.abs().max() for g in applied.values()) <= 0.01 + 1e-7
    for name, g in grads.items():
        torch.testing.assert_close(applied[name], g, rtol=1e-4, atol=1e-6)
    assert any((g.abs() > 0.0099).any() for g in applied.values())  # the clip was binding
