"""How a run's parameters are updated: optimizers, LR schedules, parameter roles, weight averaging.

- `optimizers`: the optimizer registry (`OPTIMIZERS`: torch's SGD, Adam, AdamW) and `build_optimizer`;
  `optimizer.name: roles` trains each parameter role with its own optimizer.
- `roles`: the parameter roles (`ROLES`, `roles(model)`), the optimizers a role can take (`ROLE_OPTIMIZERS`)
  and `MultiOptimizer`, several torch optimizers behaving as one.
- `muon`: `FilterMuon`, torch's Muon for conv filters.
- `schedules`: the LR-schedule registry (`SCHEDULERS`), `Schedule` and `build_schedule`.
- `lr_functions`: LR multipliers as pure functions of the step (the linear schedule's, per role).
- `averaging`: weight averaging, `EMA` and airbench's `Lookahead`.
"""
from .optimizers import OPTIMIZERS, build_optimizer
from .schedules import SCHEDULERS, Schedule, build_schedule

__all__ = ["OPTIMIZERS", "SCHEDULERS", "Schedule", "build_optimizer", "build_schedule"]
