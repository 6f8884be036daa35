"""`train.budget`: a wall-time budget for training and evaluation turned into a number of epochs.

The run times a few real steps and evaluation batches of its own model and loaders (`epoch_seconds`) and
trains as many epochs as fit in what start-up left of the budget (`budget_epochs`). Evaluation is timed as
`loop.evaluate` runs it: over the test and the validation split, with the `eval:` section's test-time
augmentation where the epoch uses it; with `eval.tta_last_only` the last evaluation's extra TTA cost is
counted once (a flip-and-translate TTA makes that pass several times a plain one).

The plan is corrected once, after the first epoch, where that epoch shows the estimate was wrong (`corrected`):
the machine's speed drifts and a probe of a few steps is a sample. The schedule stays a pure function of the
step: config.yaml records both plans and the epoch of the switch (train.budget_plan), and the linear schedule
follows the first plan up to the switch, then the rest of its course over the new epochs (`replanned` in
`optim.lr_functions`), so a resumed run rebuilds the same schedule.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import NamedTuple

import torch

from fastloader.loaders import cycle

from . import checkpoint
from .config import BudgetPlan
from .optim import build_optimizer
from .optim.schedules import REPLANNABLE
from .step import Step, train_step
from .tta import eval_logits

# a sample, not a measurement: the plan is corrected after the first epoch (`corrected`), so the probe stays short
# (every second of it comes out of the budget): 2 untimed steps, 3 timed, one timed evaluation batch of each kind
BUDGET_WARMUP, BUDGET_STEPS, BUDGET_EVAL_BATCHES = 2, 3, 1


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
    if not eval_cfg.tta_last_only:  # every epoch evaluates with TTA: no plain pass to time
        return EpochCost(train_s, evaluation_seconds(parts, model, eval_cfg, eval_batches))
    plain = evaluation_seconds(parts, model, None, eval_batches)
    with_tta = evaluation_seconds(parts, model, eval_cfg, eval_batches, warm_up=False)  # the plain pass warmed up
    return EpochCost(train_s, plain, max(0.0, with_tta - plain))


def evaluation_seconds(parts, model: torch.nn.Module, eval_cfg, batches: int = BUDGET_EVAL_BATCHES,
                       warm_up: bool = True) -> float:
    """Seconds of one evaluation over the test split and the validation split, as `loop.evaluate` computes it
    (`eval_cfg`: the `eval:` section whose TTA it uses; None: a plain forward), timed over a few test batches
    (a whole pass would be the cost itself), after one that warms up unless `warm_up` is False (a pass just
    timed warmed the loader and the model)."""
    untimed = 1 if warm_up else 0
    done, begin = 0, time.perf_counter()
    with torch.no_grad():
        for images, _ in parts.test_loader:
            with parts.precision.autocast(parts.device):
                eval_logits(model, images, eval_cfg).float().sum().item()
            done += 1
            if done == untimed:
                begin = time.perf_counter()
            elif done == batches + untimed:
                break
    per_batch = (time.perf_counter() - begin) / max(done - untimed, 1)
    val_batches = len(parts.val_loader) if parts.val_loader is not None else 0
    return per_batch * (len(parts.test_loader) + val_batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def budget_epochs(budget_s: float, spent_s: float, train_s: float, eval_s: float, max_epochs: float,
                  last_extra_s: float = 0.0) -> float:
    """Whole epochs whose training and evaluation, the last evaluation's extra cost included, fit in what is
    left of the budget (at least 1), or all of max_epochs (a fraction included) where they fit."""
    fit = int(max(0.0, budget_s - spent_s - last_extra_s) // (train_s + eval_s))
    return min(max_epochs, max(1, fit))


def planned_seconds(epochs: float, train_s: float, eval_s: float, last_extra_s: float = 0.0) -> float:
    """Training and evaluation of `epochs` epochs: a fractional last epoch trains its part, evaluates whole."""
    return epochs * train_s + math.ceil(epochs) * eval_s + last_extra_s


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
    planned = planned_seconds(epochs, cost.train, cost.evaluation, cost.last_extra)
    line = (f"train.budget {cfg.train.budget}: {epochs} epochs (at most {cfg.train.epochs}); one epoch measured at "
            f"{cost.train:.1f} s training + {cost.evaluation:.1f} s evaluation{last}, {spent:.1f} s spent before "
            f"training; planned {planned:.1f} s of training and evaluation")
    plan = BudgetPlan(seconds=budget, max_epochs=cfg.train.epochs, epochs=epochs, train_seconds=round(cost.train, 3),
                      eval_seconds=round(cost.evaluation, 3), last_extra_seconds=round(cost.last_extra, 3),
                      spent_seconds=round(spent, 3))
    return replace(cfg, train=replace(cfg.train, epochs=epochs, budget=None, budget_plan=plan)), line


def correctable(cfg) -> bool:
    """Whether the run's budget plan may still be corrected after its first epoch: a plan of more than one
    epoch (one epoch's schedule has run its course by then), not corrected yet, on a schedule that can change
    its length mid-run."""
    plan = cfg.train.budget_plan
    return (plan is not None and plan.corrected_at_epoch is None and plan.epochs > 1
            and cfg.scheduler.name in REPLANNABLE)


def corrected(cfg, elapsed_s: float, train_s: float, eval_s: float, done: int = 1) -> tuple[object, str]:
    """The plan after `done` epochs that took `train_s` + `eval_s` seconds each, `elapsed_s` after the run began:
    (config with the epochs that fit what is left, the line for train.log). The last evaluation's extra cost is
    the probe's, scaled as the measured evaluation is to the probe's. At least one more epoch (the evaluation
    just done was not the last's), at most the config's epochs. The config is unchanged when the plan holds."""
    plan = cfg.train.budget_plan
    scale = eval_s / plan.eval_seconds if plan.eval_seconds > 0 else 1.0
    last_extra = plan.last_extra_seconds * scale
    epoch_s = train_s + eval_s
    fit = done + int(max(0.0, plan.seconds - elapsed_s - last_extra) // epoch_s)
    epochs = min(plan.max_epochs, max(done + 1, fit))  # a fraction only as all of max_epochs
    said = (f"train.budget: epoch {done} took {epoch_s:.1f} s ({train_s:.1f} s training + {eval_s:.1f} s "
            f"evaluation), planned {plan.epoch_seconds():.1f} s; {elapsed_s:.1f} s of {plan.seconds:.0f} s spent")
    if epochs == cfg.train.epochs:
        return cfg, f"{said}: the plan of {epochs} epochs holds"
    new_plan = replace(plan, corrected_at_epoch=done, corrected_epoch_seconds=round(epoch_s, 3))
    line = (f"{said}: {epochs} epochs now, not {cfg.train.epochs} (at most {plan.max_epochs}); the LR schedule runs "
            f"the rest of its course over epochs {done + 1}-{epochs}")
    return replace(cfg, train=replace(cfg.train, epochs=epochs, budget_plan=new_plan)), line


def budget_use(plan, timing: list[dict]) -> str:
    """How a run kept its budget (train.log's last word on it, a row of the report): planned and actual seconds
    per epoch, and the budget used (start-up before training, the probe included, plus every epoch's training
    and evaluation, as timing.jsonl has them)."""
    evaluations = [t["eval_seconds"] for t in (timing[:-1] or timing)]  # the last one's TTA apart
    actual = sum(t["train_seconds"] for t in timing) / len(timing) + sum(evaluations) / len(evaluations)
    used = plan.spent_seconds + sum(t["seconds"] for t in timing)
    corrected = (f" (corrected after epoch {plan.corrected_at_epoch}; the probe's {plan.train_seconds + plan.eval_seconds:.1f} s)"
                 if plan.corrected_at_epoch is not None else "")
    return (f"planned {plan.epoch_seconds():.1f} s an epoch{corrected}, actual "
            f"{actual:.1f} s on average ({100 * (actual / plan.epoch_seconds() - 1):+.0f}%, the last evaluation's TTA "
            f"apart); used "
            f"{used:.0f} s of {plan.seconds:.0f} s ({100 * used / plan.seconds:.0f}%)")
