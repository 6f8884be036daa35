"""The LR-schedule registry: torch's schedulers, configured from `SchedulerConfig`.

A `Schedule` hides when each torch scheduler steps: the loop calls `after_batch()` after every
optimizer step and `after_epoch(metrics)` at each epoch end, whatever the scheduler.

torch is imported inside the functions that use it: config validation reads `SCHEDULERS` from here,
and a config's mistakes are reported before torch loads (seconds).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from beton.errors import UserError

from ..config import BudgetPlan, SchedulerConfig, steps_in
from .lr_functions import linear, replanned

if TYPE_CHECKING:
    import torch


class Schedule:
    """A torch LR scheduler (None: constant LR) and when to step it.

    `per_batch` schedulers step in `after_batch`, the others in `after_epoch`;
    ReduceLROnPlateau is given the epoch's `monitor` metric (test_loss, test_acc, val_loss or val_acc).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Optional[object], per_batch: bool,
                 monitor: str = "test_loss"):
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.per_batch = per_batch
        self.monitor = monitor

    def after_batch(self) -> None:
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def after_epoch(self, metrics: dict) -> None:
        """`metrics`: the epoch's metrics line (test_loss, test_acc, and val_loss, val_acc with a split)."""
        if self.scheduler is None or self.per_batch:
            return
        from torch.optim import lr_scheduler

        if isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics[self.monitor])
        else:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        """The current LR of the first param group."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def kind(self) -> str:
        return "none" if self.scheduler is None else type(self.scheduler).__name__

    def state_dict(self) -> dict:
        """Plain values only (torch schedulers keep no callables), so weights_only loading reads it."""
        state = self.scheduler.state_dict() if self.scheduler is not None else {}
        return {"kind": self.kind, "scheduler": state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise UserError(f"the checkpoint's LR schedule is {state.get('kind')}, the config's is {self.kind}")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def _onecycle(optimizer, cfg: SchedulerConfig, epochs: float, steps_per_epoch: int, base_lr: float,
              plan: BudgetPlan | None = None) -> Schedule:
    """One cycle, stepped per batch: from max_lr/div_factor up to max_lr, then down to
    initial_lr/final_div_factor.

    The peak is the LR of the last batch of epoch `peak_epoch` (counting from 1), that is
    optimizer step peak_epoch * steps_per_epoch, give or take one for float rounding. The seed recipe
    "max at epoch 5 of 24, no annihilation" is `peak_epoch: 5` with `final_div_factor: 1`:
    the LR ends where it started, at max_lr/div_factor, never below.
    max_lr defaults to `base_lr` (the optimizer's LR); "find" must be resolved by the caller.
    """
    from torch.optim import lr_scheduler

    max_lr = cfg.max_lr if cfg.max_lr is not None else base_lr
    if max_lr == "find" or cfg.start_lr == "find":
        raise ValueError("scheduler max_lr/start_lr 'find' must be resolved to numbers before building the schedule")
    div_factor = cfg.div_factor if cfg.start_lr is None else float(max_lr) / cfg.start_lr
    if div_factor < 1:
        raise UserError(f"scheduler.start_lr ({cfg.start_lr:.3g}) must not exceed max_lr ({float(max_lr):.3g})")
    if cfg.peak_epoch is not None and cfg.peak_epoch >= epochs:
        raise UserError(f"scheduler.peak_epoch ({cfg.peak_epoch:g}) must be less than train.epochs ({epochs}); "
                        f"for a short run add --set scheduler.peak_epoch={max(epochs / 4, 0.25):g}")
    total = steps_in(epochs, steps_per_epoch)
    if total < 4:
        raise UserError(f"onecycle needs at least 4 optimizer steps, this run has {total} "
                        f"({epochs} epochs x {steps_per_epoch} batches); train longer or on more images")
    import torch

    if cfg.cycle_momentum and isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0:
        raise UserError("onecycle cycles momentum between 0.85 and 0.95, overriding optimizer.momentum 0; "
                        "set scheduler.cycle_momentum: false to keep SGD without momentum")
    pct_start = cfg.peak_epoch / epochs if cfg.peak_epoch is not None else cfg.pct_start
    # torch divides by each phase's length in steps: keep both phases at least 2 steps long
    pct_start = min(max(pct_start, 2 / total), 1 - 2 / total)
    scheduler = lr_scheduler.OneCycleLR(
        optimizer, max_lr=float(max_lr), total_steps=total, pct_start=pct_start,
        div_factor=div_factor, final_div_factor=cfg.final_div_factor, three_phase=cfg.three_phase,
        anneal_strategy=cfg.anneal_strategy, cycle_momentum=cfg.cycle_momentum)
    return Schedule(optimizer, scheduler, per_batch=True)


def _step(optimizer, cfg: SchedulerConfig, epochs: float, steps_per_epoch: int, base_lr: float,
          plan: BudgetPlan | None = None) -> Schedule:
    """LR times gamma every step_size epochs."""
    from torch.optim import lr_scheduler

    return Schedule(optimizer, lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma),
                    per_batch=False)


def _plateau(optimizer, cfg: SchedulerConfig, epochs: float, steps_per_epoch: int, base_lr: float,
             plan: BudgetPlan | None = None) -> Schedule:
    """LR times factor once `monitor` has not improved (by `threshold`, relative) for more than `patience` epochs."""
    from torch.optim import lr_scheduler

    scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, mode=cfg.mode, factor=cfg.factor, patience=cfg.patience,
                                               threshold=cfg.threshold, min_lr=cfg.min_lr)
    return Schedule(optimizer, scheduler, per_batch=False, monitor=cfg.monitor)


def _cosine(optimizer, cfg: SchedulerConfig, epochs: float, steps_per_epoch: int, base_lr: float,
            plan: BudgetPlan | None = None) -> Schedule:
    """Half a cosine from the optimizer's LR to eta_min over the whole run, per batch."""
    from torch.optim import lr_scheduler

    scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_in(epochs, steps_per_epoch), eta_min=cfg.eta_min)
    return Schedule(optimizer, scheduler, per_batch=True)


def _linear(optimizer, cfg: SchedulerConfig, epochs: float, steps_per_epoch: int, base_lr: float,
            plan: BudgetPlan | None = None) -> Schedule:
    """Per batch: every group's LR warms up linearly over warmup_epochs, then falls linearly to end_factor x LR
    at the last step (airbench's schedule is warmup 0, end 0).

    With a `plan` corrected after k epochs (train.budget): the schedule of plan.epochs up to epoch k, then the
    rest of its fall over `epochs` (`replanned`); role_epochs keep their own length, that of the first plan."""
    from torch.optim import lr_scheduler

    planned = plan.epochs if plan is not None and plan.corrected_at_epoch is not None else epochs
    total = steps_in(planned, steps_per_epoch)
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    everyone = linear(total, warmup, cfg.end_factor)
    if planned != epochs:
        everyone = replanned(everyone, plan.corrected_at_epoch * steps_per_epoch, total, steps_in(epochs, steps_per_epoch))
    if not cfg.role_epochs:
        return Schedule(optimizer, lr_scheduler.LambdaLR(optimizer, everyone), per_batch=True)
    roles = {g.get("role") for g in optimizer.param_groups}
    missing = sorted(set(cfg.role_epochs) - roles)
    if missing:
        raise UserError(f"scheduler.role_epochs names {', '.join(missing)}, which this model and optimizer do not "
                        f"have (roles here: {', '.join(sorted(r for r in roles if r)) or 'none: use optimizer.name roles'})")
    by_role = {}
    for role, e in cfg.role_epochs.items():  # a shorter decay for these roles; the warm-up is the run's
        steps = max(1, min(total, round(e * steps_per_epoch)))
        by_role[role] = linear(steps, min(warmup, steps - 1), cfg.end_factor)
    from .roles import group_lambdas

    return Schedule(optimizer, lr_scheduler.LambdaLR(optimizer, group_lambdas(optimizer, by_role, everyone)),
                    per_batch=True)


def _constant(optimizer, cfg: SchedulerConfig, epochs: float, steps_per_epoch: int, base_lr: float,
              plan: BudgetPlan | None = None) -> Schedule:
    return Schedule(optimizer, None, per_batch=False)


# the schedules whose course a corrected plan can change mid-run (train.budget): linear continues its fall over the
# new length; step, plateau and none do not depend on it. onecycle and cosine are torch schedulers whose length is
# fixed when they are built, so their plan stays.
REPLANNABLE = ("linear", "step", "plateau", "none")

SCHEDULERS: dict[str, Callable[..., Schedule]] = {
    "onecycle": _onecycle,
    "step": _step,
    "plateau": _plateau,
    "cosine": _cosine,
    "linear": _linear,
    "none": _constant,
}


def build_schedule(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: float, steps_per_epoch: int,
                   base_lr: float, plan: BudgetPlan | None = None) -> Schedule:
    """The configured schedule over `epochs` x `steps_per_epoch` optimizer steps.

    `base_lr` is the peak for onecycle without scheduler.max_lr; the other schedules start
    from the LR the optimizer was built with. `plan`: train.budget_plan, where a corrected plan changes the
    course of a linear schedule (REPLANNABLE).
    """
    if cfg.name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {cfg.name!r}; known: {', '.join(SCHEDULERS)}")
    if not epochs > 0 or steps_per_epoch < 1:
        raise UserError(f"a schedule needs at least one epoch and one batch per epoch "
                        f"(got {epochs} epochs of {steps_per_epoch} batches)")
    if plan is not None and plan.corrected_at_epoch is not None and cfg.name not in REPLANNABLE:
        raise UserError(f"train.budget_plan: a {cfg.name} schedule's length cannot change mid-run")
    return SCHEDULERS[cfg.name](optimizer, cfg, epochs, steps_per_epoch, base_lr, plan)


def continued(schedule: Schedule, cfg: SchedulerConfig, epochs: float, steps_per_epoch: int, base_lr: float,
              plan: BudgetPlan) -> Schedule:
    """`schedule` rebuilt for a corrected `plan`, at the step it has reached: its state (the step) carries over
    and the optimizer's LRs stay as they are (building a LambdaLR sets them to step 0's), which equal the new
    schedule's there (`replanned`)."""
    optimizer = schedule.optimizer
    lrs = [group["lr"] for group in optimizer.param_groups]
    state = schedule.state_dict()
    rebuilt = build_schedule(optimizer, cfg, epochs, steps_per_epoch, base_lr, plan)
    rebuilt.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return rebuilt
