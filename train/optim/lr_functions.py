"""Learning-rate functions of the step, nanoGPT style: pure functions returning a multiplier.

A multiplier of the step, not a scheduler object: any number of parameter groups can each take
their own (airbench decays the whitening bias's LR to zero over its first epochs and everything
else over the whole run), torch's LambdaLR runs them (`LambdaLR(optimizer, [fn, ...])`, one per
group; `train.optim.roles.group_lambdas` picks them by role), a loop can also set
`group["lr"] = base_lr * fn(step)` itself, and resuming is only knowing the step.

Step counts from 0: the multiplier for step s is the one the s-th optimizer step uses (LambdaLR
calls fn(0) when built and fn(s) after its s-th `step()`).
"""
from __future__ import annotations

import functools

from beton.errors import UserError


def linear_decay(step: int, total: int, warmup: int = 0, end: float = 0.0) -> float:
    """Linear warmup over `warmup` steps, then linear decay from 1 to `end` at step `total`.

    Warmup: (step + 1) / (warmup + 1) for step < warmup, so no step has a zero LR and step
    `warmup` is the first at 1. Decay: 1 at step `warmup`, `end` at step `total` and after
    (airbench's 1 - step / total is warmup=0, end=0).
    """
    if total < 1 or not 0 <= warmup < total:
        raise UserError(f"linear_decay needs 0 <= warmup < total and total >= 1, got warmup={warmup}, total={total}")
    if not 0 <= end <= 1:
        raise UserError(f"linear_decay: end must be in [0, 1], got {end}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= total:
        return float(end)
    return 1.0 - (1.0 - end) * (step - warmup) / (total - warmup)


def linear(total: int, warmup: int = 0, end: float = 0.0):
    """`linear_decay` with its shape fixed: a one-argument function of the step, for LambdaLR.

    A functools.partial, not a lambda: LambdaLR's state_dict then stays plain data."""
    linear_decay(0, total, warmup, end)  # check the arguments now, not at the first step
    return functools.partial(linear_decay, total=total, warmup=warmup, end=end)


def replanned_multiplier(step: int, fn, switch: int, planned: int, total: int) -> float:
    """`fn`, a multiplier for a run of `planned` steps, in a run whose plan changed at step `switch` to `total`
    steps: the same up to `switch`, then the rest of fn's course (switch to planned) stretched or squeezed over
    switch to total, so the LR neither jumps nor ends early (train.budget's one correction; fn takes a
    fractional step)."""
    if step <= switch:
        return fn(step)
    return fn(switch + (step - switch) * (planned - switch) / (total - switch))


def replanned(fn, switch: int, planned: int, total: int):
    """`replanned_multiplier` with its shape fixed, for LambdaLR (a partial: its state stays plain data)."""
    if not 0 < switch < min(planned, total):
        raise UserError(f"a plan changes between its first and last step: got switch {switch} of {planned} "
                        f"planned and {total} now")
    return functools.partial(replanned_multiplier, fn=fn, switch=switch, planned=planned, total=total)
