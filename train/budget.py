"""`train.budget`: a wall-time budget for training and evaluation turned into a number of epochs.

The run times a few real steps and evaluation batches of its own model and loaders (`epoch_seconds`) and
trains as many epochs as fit in what start-up left of the budget (`budget_epochs`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace

import torch

from fastloader.loaders import cycle

from . import checkpoint
from .optim import build_optimizer
from .step import Step, train_step

BUDGET_WARMUP, BUDGET_STEPS, BUDGET_EVAL_BATCHES = 2, 6, 4


def epoch_seconds(parts, steps: int = BUDGET_STEPS, eval_batches: int = BUDGET_EVAL_BATCHES) -> tuple[float, float]:
    """(train, evaluation) seconds of one epoch of RunParts `parts`, timed over a few real batches.

    Steps train a copy of the model with a fresh optimizer (the run's model, RNG and loader epoch are
    left as they were); the first BUDGET_WARMUP steps are not timed (compilation, caches). Under torchrun
    every rank runs it on its shard (the same number of steps each): with model.sync_bn each training
    forward is a collective, which one rank alone would wait on until train.dist_timeout."""
    model = copy.deepcopy(parts.model)
    step = Step.create(model, build_optimizer(model, parts.cfg.optimizer), precision=parts.precision,
                       device=parts.device, train_cfg=parts.cfg.train)
    with checkpoint.rng_and_epoch_restored(parts.train_loader):
        batches = cycle(parts.train_loader)
        try:
            model.train()
            for i in range(BUDGET_WARMUP + steps):
                if i == BUDGET_WARMUP:
                    _sync(parts.device)
                    begin = time.perf_counter()
                images, labels = next(batches)
                loss, _ = train_step(step, images, labels)
            loss.item()
            per_step = (time.perf_counter() - begin) / steps
        finally:
            batches.close()
    model.eval()
    timed, begin = 0, time.perf_counter()
    with torch.no_grad():
        for images, _ in parts.test_loader:  # a whole test epoch would be the cost itself: a few batches
            with parts.precision.autocast(parts.device):
                model(images).float().sum().item()
            timed += 1
            if timed == 1:  # the first one warms up
                begin = time.perf_counter()
            elif timed == eval_batches + 1:
                break
    per_eval_batch = (time.perf_counter() - begin) / max(timed - 1, 1)
    return per_step * len(parts.train_loader), per_eval_batch * len(parts.test_loader)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def budget_epochs(budget_s: float, spent_s: float, train_s: float, eval_s: float, max_epochs: int) -> int:
    """Epochs whose training and evaluation fit in what is left of the budget (at least 1, at most max_epochs)."""
    return int(max(1, min(max_epochs, (budget_s - spent_s) // (train_s + eval_s))))


def resolve_budget(parts, started: float) -> tuple[object, str | None]:
    """`train.budget` -> a number of epochs: (config with epochs set and budget null, the line for train.log).

    `started`: time.perf_counter() when the run began (what start-up already spent counts)."""
    cfg = parts.cfg
    budget = cfg.train.budget_seconds()
    if budget is None:
        return cfg, None
    train_s, eval_s = epoch_seconds(parts)
    spent = time.perf_counter() - started
    epochs = budget_epochs(budget, spent_s=spent, train_s=train_s, eval_s=eval_s, max_epochs=cfg.train.epochs)
    line = (f"train.budget {cfg.train.budget}: {epochs} epochs (at most {cfg.train.epochs}); one epoch measured at "
            f"{train_s:.1f} s training + {eval_s:.1f} s evaluation, {spent:.1f} s spent before training")
    return replace(cfg, train=replace(cfg.train, epochs=epochs, budget=None)), line
