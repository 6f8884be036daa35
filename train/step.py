"""One training step, the only one: the loop, the LR range test and the benchmarks all call `train_step`.

A step is: forward under autocast, cross-entropy (with label smoothing), backward through the
GradScaler, clipping (by norm, by value, or both, on unscaled gradients), the optimizer step, the
weight average's update (train.ema_decay), and the schedule's per-batch step. The scaler is always there: `GradScaler(enabled=False)` passes
the loss and the optimizer step through unchanged, so fp32 and bf16 take the same code as fp16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .hardware import Precision


@dataclass
class Step:
    """What a step needs besides the batch; built once per run (or per benchmark)."""

    model: torch.nn.Module  # the model the step runs (DDP-wrapped and/or compiled where asked)
    optimizer: torch.optim.Optimizer
    precision: Precision
    device: torch.device
    scaler: torch.amp.GradScaler
    schedule: Optional[object] = None  # optim.Schedule: stepped after every optimizer step (None: the caller sets LRs)
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None  # max global gradient norm
    grad_clip_value: Optional[float] = None  # max absolute gradient element
    ema: Optional[object] = None  # averaging.EMA: folds the weights in after the optimizer step

    @classmethod
    def create(cls, model, optimizer, precision: Precision, device: torch.device, train_cfg=None,
               schedule=None) -> "Step":
        """A step configured from `train_cfg` (a TrainConfig: label smoothing and clipping)."""
        return cls(model, optimizer, precision, device, precision.scaler(device), schedule,
                   label_smoothing=getattr(train_cfg, "label_smoothing", 0.0),
                   grad_clip=getattr(train_cfg, "grad_clip", None),
                   grad_clip_value=getattr(train_cfg, "grad_clip_value", None))


def train_step(step: Step, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns (the batch's mean loss, detached, and the logits)."""
    with step.precision.autocast(step.device):
        logits = step.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=step.label_smoothing)
    step.optimizer.zero_grad(set_to_none=True)
    step.scaler.scale(loss).backward()
    if step.grad_clip or step.grad_clip_value:
        step.scaler.unscale_(step.optimizer)  # clip the true gradients, not the scaled ones
        if step.grad_clip_value:  # first each element, then the whole vector's norm
            torch.nn.utils.clip_grad_value_(step.model.parameters(), step.grad_clip_value)
        if step.grad_clip:
            torch.nn.utils.clip_grad_norm_(step.model.parameters(), step.grad_clip)
    step.scaler.step(step.optimizer)  # skips the step if fp16 gradients overflowed
    step.scaler.update()
    if step.ema is not None:
        step.ema.after_step()
    if step.schedule is not None:
        step.schedule.after_batch()
    return loss.detach(), logits
