"""`train.budget`: a wall-time budget for training and evaluation turned into a number of epochs.

The run times a few real steps and evaluation batches of its own model and loaders (`epoch_seconds`) and
trains as many epochs as fit in what start-up left of the budget (`budget_epochs`). Evaluation is timed as
`loop.evaluate` runs it: over the test and the validation split, with the `eval:` section's test-time
augmentation where the epoch uses it; with `eval.tta_last_only` the last evaluation's extra TTA cost is
counted once (a flip-and-translate TTA makes that pass several times a plain one).
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import NamedTuple

import torch

from fastloader.loaders import cycle

from . import checkpoint
from .optim import build_optimizer
from .step import Step, train_step
from .tta import eval_logits

BUDGET_WARMUP, BUDGET_STEPS, BUDGET_EVAL_BATCHES = 2, 6, 4


class EpochCost(NamedTuple):
    """Seconds of one epoch, as `epoch_seconds` measured them."""

    train: float  # the training pass
    evaluation: float  # an epoch's evaluation (test and validation splits, TTA where every epoch uses it)
    last_extra: float = 0.0  # what the last evaluation adds (eval.tta_last_only: its TTA over a plain pass)


def epoch_seconds(parts, steps: int = BUDGET_STEPS, eval_batches: int = BUDGET_EVAL_BATCHES) -> EpochCost:
    """The seconds of one epoch of RunParts `parts`, timed over a few real batches.

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
    train_s, eval_cfg = per_step * len(parts.train_loader), parts.cfg.eval
    if eval_cfg.tta == "none":
        return EpochCost(train_s, evaluation_seconds(parts, model, None, eval_batches))
    with_tta = evaluation_seconds(parts, model, eval_cfg, eval_batches)
    if not eval_cfg.tta_last_only:  # every epoch evaluates with TTA: no plain pass to time
        return EpochCost(train_s, with_tta)
    plain = evaluation_seconds(parts, model, None, eval_batches)
    return EpochCost(train_s, plain, max(0.0, with_tta - plain))


def evaluation_seconds(parts, model: torch.nn.Module, eval_cfg, batches: int = BUDGET_EVAL_BATCHES) -> float:
    """Seconds of one evaluation over the test split and the validation split, as `loop.evaluate` computes it
    (`eval_cfg`: the `eval:` section whose TTA it uses; None: a plain forward), timed over a few test batches
    after one that warms up (a whole pass would be the cost itself)."""
    timed, begin = 0, time.perf_counter()
    with torch.no_grad():
        for images, _ in parts.test_loader:
            with parts.precision.autocast(parts.device):
                eval_logits(model, images, eval_cfg).float().sum().item()
            timed += 1
            if timed == 1:  # the first one warms up
                begin = time.perf_counter()
            elif timed == batches + 1:
                break
    per_batch = (time.perf_counter() - begin) / max(timed - 1, 1)
    val_batches = len(parts.val_loader) if parts.val_loader is not None else 0
    return per_batch * (len(parts.test_loader) + val_batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def budget_epochs(budget_s: float, spent_s: float, train_s: float, eval_s: float, max_epochs: int,
                  last_extra_s: float = 0.0) -> int:
    """Epochs whose training and evaluation, the last evaluation's extra cost included, fit in what is left of
    the budget (at least 1, at most max_epochs)."""
    return int(max(1, min(max_epochs, (budget_s - spent_s - last_extra_s) // (train_s + eval_s))))


def resolve_budget(parts, started: float) -> tuple[object, str | None]:
    """`train.budget` -> a number of epochs: (config with epochs set and budget null, the line for train.log).

    `started`: time.perf_counter() when the run began (what start-up already spent counts)."""
    cfg = parts.cfg
    budget = cfg.train.budget_seconds()
    if budget is None:
        return cfg, None
    cost = epoch_seconds(parts)
    spent = time.perf_counter() - started
    epochs = budget_epochs(budget, spent_s=spent, train_s=cost.train, eval_s=cost.evaluation,
                           max_epochs=cfg.train.epochs, last_extra_s=cost.last_extra)
    last = f" (+ {cost.last_extra:.1f} s for the last evaluation's TTA)" if cost.last_extra else ""
    planned = epochs * (cost.train + cost.evaluation) + cost.last_extra
    line = (f"train.budget {cfg.train.budget}: {epochs} epochs (at most {cfg.train.epochs}); one epoch measured at "
            f"{cost.train:.1f} s training + {cost.evaluation:.1f} s evaluation{last}, {spent:.1f} s spent before "
            f"training; planned {planned:.1f} s of training and evaluation")
    return replace(cfg, train=replace(cfg.train, epochs=epochs, budget=None)), line
