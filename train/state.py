"""The state a run carries from epoch to epoch, and the checkpoint it becomes.

`start_training` builds it from a run's `RunParts`: optimizer, schedule, the step (with the model DDP-wrapped and
compiled where asked) and the model evaluation runs. `state_dict`/`load_state_dict` turn it into
plain data and back (a checkpoint, read with `weights_only=True`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from beton.errors import UserError

from . import checkpoint, distributed
from .models import module_hooks
from .optim import Schedule, build_optimizer, build_schedule
from .optim.schedules import continued
from .optim.averaging import EMA
from .parts import RunParts
from .step import Step


@dataclass
class Training:
    model: torch.nn.Module  # the bare model: checkpoints hold its weights
    step: Step  # trains step.model: the model, DDP-wrapped under torchrun, compiled with train.compile
    eval_model: torch.nn.Module  # what evaluation runs (compiled where asked; never DDP: no collective per batch)
    schedule: Schedule
    ema: EMA | None = None  # train.ema_decay: the averaged weights evaluation and the analysis use
    epoch: int = 0  # epochs done
    history: list = field(default_factory=list)  # metrics lines
    timing: list = field(default_factory=list)  # timing lines
    best_acc: float = -1.0
    notes: list = field(default_factory=list)  # what loading a checkpoint could not restore, for the run's log

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    def begin_epoch(self, epoch: int, cfg) -> None:
        """What changes at an epoch boundary: the model's `begin_epoch` hooks run (the contract: `train.models`);
        airnet's whitening bias stops training after N epochs.

        Frozen means requires_grad off, as in one process (no gradient, no optimizer update, and no
        backward through the whitening conv's output: that is the speed the freeze is for). Under
        torchrun, DDP reduces the parameters that required grad when it was wrapped, so any change
        to that set here re-wraps the step's model (`distributed.rewrap`); every rank does it at the
        same epoch. One process trains exactly as before."""
        trainable = _trainable(self.model)
        for begin_epoch in module_hooks(self.model, "begin_epoch"):
            begin_epoch(epoch, cfg.train)
        if _trainable(self.model) != trainable:
            wrapped = getattr(self.step.model, "_orig_mod", self.step.model)  # the DDP under torch.compile
            rewrapped = distributed.rewrap(wrapped, self.step.device)
            if rewrapped is not wrapped:
                self.step.model = torch.compile(rewrapped) if cfg.train.compile else rewrapped

    def follow(self, cfg, steps_per_epoch: int) -> None:
        """Continue under config `cfg`, whose train.budget_plan was corrected at this step (budget.corrected):
        the schedule runs the rest of its course over the new number of epochs."""
        self.schedule = continued(self.schedule, cfg.scheduler, cfg.train.epochs, steps_per_epoch,
                                  cfg.optimizer.lr, cfg.train.budget_plan)
        self.step.schedule = self.schedule

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[torch.nn.Module]:
        """The model evaluation runs: the averaged weights swapped in with train.ema_decay."""
        if self.ema is None:
            yield self.eval_model
        else:
            with self.ema.averaged():
                yield self.eval_model

    def state_dict(self, cfg, epochs_done: int, partial: dict | None = None) -> dict:
        """A checkpoint after `epochs_done` epochs (and `partial["batch"]` batches of the next)."""
        scaler = self.step.scaler
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": checkpoint.rng_state(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": epochs_done, "history": self.history, "timing": self.timing, "best_acc": self.best_acc,
                "config": cfg.to_dict(), "partial": partial}

    def load_state_dict(self, state: dict, where) -> dict | None:
        """Continue from a checkpoint; returns its mid-epoch progress (None: it ends an epoch)."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            if self.step.scaler.is_enabled() and state.get("scaler"):
                self.step.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            unrestored = checkpoint.set_rng_state(state["rng"])
            self.notes = [unrestored] if unrestored else []
            self.history, self.best_acc, self.epoch = list(state["history"]), float(state["best_acc"]), int(state["epoch"])
            self.timing = list(state.get("timing") or [])
            return state.get("partial")
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"{where} does not fit this run's config ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'missing data'})") from e


def _trainable(model: torch.nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


def start_training(parts: RunParts) -> Training:
    """Optimizer, schedule and step for the model of `parts`, at epoch 0."""
    cfg = parts.cfg
    optimizer = build_optimizer(parts.model, cfg.optimizer)
    schedule = build_schedule(optimizer, cfg.scheduler, epochs=cfg.train.epochs,
                              steps_per_epoch=len(parts.train_loader), base_lr=cfg.optimizer.lr,
                              plan=cfg.train.budget_plan)
    wrapped = distributed.wrap(parts.model, parts.device)
    train_model = torch.compile(wrapped) if cfg.train.compile else wrapped
    if not parts.world.active:
        eval_model = train_model
    else:
        eval_model = torch.compile(parts.model) if cfg.train.compile else parts.model
    step = Step.create(train_model, optimizer, precision=parts.precision, device=parts.device,
                       train_cfg=cfg.train, schedule=schedule)
    if cfg.train.ema_decay is not None:
        step.ema = EMA(parts.model, cfg.train.ema_decay, cfg.train.ema_every)
    return Training(model=parts.model, step=step, eval_model=eval_model, schedule=schedule, ema=step.ema)
