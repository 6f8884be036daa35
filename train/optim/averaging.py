"""Weight averaging: an exponential moving average of the weights, and airbench's Lookahead.

Averaging the weights over the last stretch of training evaluates like a model trained with a
smaller, annealed LR, at no cost in steps. `EMA` keeps an averaged copy of the model's state
(parameters and buffers: floating tensors are averaged, integer ones such as BatchNorm's batch
counter are copied) and updates it every `every` optimizer steps:

    average <- decay * average + (1 - decay) * model

`decay` applies per update, so with `every=k` the average forgets k times more slowly in steps.
`averaged()` swaps the averaged weights into the model for an evaluation and restores them after.

`Lookahead` is what airbench94 (legacy) did: the same update, then the model itself is reset to
the average ("slow weights" that the fast weights are pulled back to), with a decay that can
change per update (airbench raised it along the run) and `finish()` to end on the average.
`state_dict()` is plain data (tensors, numbers), for checkpoints read with weights_only=True.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """An exponential moving average of `model`'s state, updated every `every` steps."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA every must be at least 1, got {every}")
        self.model, self.decay, self.every = model, float(decay), int(every)
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0
        self.steps = 0  # optimizer steps seen by `after_step`

    def after_step(self) -> bool:
        """Called after every optimizer step (the training step does): updates every `every` steps."""
        self.steps += 1
        return self.update(self.steps)

    @torch.no_grad()
    def update(self, step: int, decay: float | None = None) -> bool:
        """After optimizer step `step` (counting from 1): fold the model into the average when
        `step` is a multiple of `every`; returns whether it did. `decay` overrides self.decay once."""
        if step % self.every:
            return False
        weight = 1.0 - (self.decay if decay is None else float(decay))
        for key, live in self.model.state_dict().items():
            avg = self.average[key]
            if avg.is_floating_point():
                avg.lerp_(live.detach().to(avg.dtype), weight)
            else:
                avg.copy_(live)
        self.updates += 1
        return True

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Load the averaged state into `model` (default: the averaged model itself)."""
        (model or self.model).load_state_dict(self.average)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights; its own come back after."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.copy_to()
        try:
            yield self.model
        finally:
            self.model.load_state_dict(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "updates": self.updates, "steps": self.steps,
                "average": {k: v.clone() for k, v in self.average.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["average"]) != set(self.average):
            raise ValueError("the saved average does not hold this model's state")
        with torch.no_grad():
            for key, value in state["average"].items():
                self.average[key].copy_(value)
        self.decay, self.every, self.updates = float(state["decay"]), int(state["every"]), int(state["updates"])
        self.steps = int(state.get("steps", 0))


class Lookahead(EMA):
    """EMA whose update also resets the model to the average (airbench94's LookaheadState)."""

    @torch.no_grad()
    def update(self, step: int, decay: float | None = None) -> bool:
        if not super().update(step, decay):
            return False
        self.copy_to()
        return True

    def finish(self) -> None:
        """End on the average (airbench's last update with decay 1: the model takes the slow weights)."""
        self.copy_to()
