"""LR range test (`fastcifar lr-find`) and `scheduler.max_lr: find`.

The test trains from the current weights for up to `iters` batches of the train loader
(cycling epochs if needed), the LR growing exponentially from `start` to `end`:
lr_i = start * (end / start) ** (i / (iters - 1)). It records each batch's loss and an
exponential moving average with bias correction,
    avg_i = smooth * avg_(i-1) + (1 - smooth) * loss_i,   smoothed_i = avg_i / (1 - smooth ** (i + 1)),
and stops once the smoothed loss, or one batch's loss, exceeds `diverge` times the best smoothed loss so far
(or is not finite): the smoothed loss lags the raw one by about 1 / (1 - smooth) steps (50 at 0.98, half of a
100-step test), so on its own it let a test run on for 30 steps after the loss had exploded, into LRs where
the net collapses and recovers (seed C's custom ResNet: 2.4 at lr 1e-2, 23 at 4e-2, 3.0 again at 0.5).
Under torchrun each rank trains on its shard and the loss is the mean over ranks, so all
ranks stop at the same step.
Afterwards the model's weights and buffers, the optimizer's state, the RNG state and the train
loader's epoch counter are restored from deep copies: training after a range test is the same
as training without one.

Suggestions, all among the tested LRs up to the minimum of the smoothed loss (past it the loss is rising or
has diverged, and a "steepest fall" there is a recovery from divergence, not a learning rate):
- steepest: where the smoothed loss falls fastest per decade of LR (most negative
  d smoothed / d log10 lr);
- valley: the middle (geometric mean of its first and last LR) of the longest stretch of steps
  over which the smoothed loss keeps falling: well inside the region where training improves,
  short of the minimum where it starts to fail (`max_lr: find`'s default);
- minimum: the LR of the minimum smoothed loss, where the loss stops falling: Leslie Smith's upper bound for
  a one-cycle schedule (arXiv:1803.09820, section 4.1), whose warm-up lets the net reach an LR that the
  range test's abrupt climb only just tolerated;
- min/10: the LR of the minimum smoothed loss, divided by 10 (the classic rule of thumb),
  raised to `start` if it would fall below the tested range.
`scheduler.max_lr: find` takes `scheduler.max_lr_rule` (default valley).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from beton.atomic import atomic_path, atomic_write_text
from beton.errors import Interrupted, UserError
from fastloader.loaders import cycle

from . import checkpoint as ckpt
from . import distributed
from .config import LR_SUGGESTIONS, ExperimentConfig
from .optim import build_optimizer
from .parts import RunParts, build
from .step import Step, train_step
from .stop import requested as stop_requested


# ---------------------------------------------------------------- the test


def _check_range(start: float, end: float, iters: int, smooth: float, diverge: float) -> None:
    if not (start > 0 and end > start and math.isfinite(end)):
        raise UserError(f"the LR range must satisfy 0 < start < end, got start {start:g}, end {end:g}")
    if iters < 2:
        raise UserError(f"--iters must be at least 2, got {iters}")
    if not 0 <= smooth < 1:
        raise UserError(f"smooth must be in [0, 1), got {smooth}")
    if diverge <= 1:
        raise UserError(f"diverge must be greater than 1, got {diverge}")


def range_test(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, *, precision, device,
               start: float = 1e-7, end: float = 10.0, iters: int = 100, smooth: float = 0.98,
               diverge: float = 4.0, train_cfg=None, progress: bool = True) -> dict:
    """Run the range test on `model` with `optimizer` over `loader`; restores all state afterwards.

    Each batch is one `train_step` (the training loop's own, with `train_cfg`'s label smoothing and
    clipping), its LR set beforehand. Returns the result dict (see `lr_find`).
    """
    _check_range(start, end, iters, smooth, diverge)
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    step = Step.create(model, optimizer, precision=precision, device=device, train_cfg=train_cfg)  # LR set here
    factor = (end / start) ** (1.0 / (iters - 1))
    lrs, losses, smoothed = [], [], []
    avg, best, stop_reason, interrupted = 0.0, math.inf, None, False
    with ckpt.rng_and_epoch_restored(loader):
        batches = cycle(loader)
        try:
            model.train()
            bar = _bar(iters, progress)
            for i in range(iters):
                images, labels = next(batches)
                lr = start * factor ** i
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, _ = train_step(step, images, labels)
                # under torchrun every rank tests on its shard: the mean loss over ranks decides for all, so they
                # stop at the same step (SyncBatchNorm's collectives in each forward must match; rank 0's result
                # is used); a stop request (Ctrl-C, SIGTERM) on any rank travels in the same sum: every rank stops
                # after this step
                loss_sum, stops = distributed.all_sum([float(loss.float().item()), float(stop_requested())], device)
                if stops:
                    interrupted = True
                    break
                value = loss_sum / distributed.current().size
                avg = smooth * avg + (1 - smooth) * value
                smoothed_loss = avg / (1 - smooth ** (i + 1))
                bar.update(1)
                if not math.isfinite(smoothed_loss):
                    stop_reason = f"loss became {value} at lr {lr:.3e}"
                    break
                lrs.append(lr)
                losses.append(value)
                smoothed.append(smoothed_loss)
                best = min(best, smoothed_loss)
                bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smoothed_loss:.4f}", refresh=False)
                if smoothed_loss > diverge * best:
                    stop_reason = f"smoothed loss {smoothed_loss:.4f} > {diverge:g} x best {best:.4f} at lr {lr:.3e}"
                    break
                if value > diverge * best:
                    stop_reason = f"batch loss {value:.4f} > {diverge:g} x best smoothed {best:.4f} at lr {lr:.3e}"
                    break
            bar.close()
        finally:
            batches.close()  # ends the epoch in progress
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            optimizer.zero_grad(set_to_none=True)
            model.train(was_training)
    if interrupted:
        raise Interrupted(f"the LR range test stopped after {len(lrs)} of {iters} steps; nothing was written")
    if len(lrs) < 2:
        raise UserError(f"the LR range test stopped after {len(lrs)} step(s) ({stop_reason}); "
                        f"start lower than {start:g}")
    return {"start": start, "end": end, "iters": iters, "smooth": smooth, "diverge": diverge,
            "steps": len(lrs), "stopped_early": stop_reason is not None, "stop_reason": stop_reason,
            "lr": lrs, "loss": losses, "smoothed": smoothed, "suggestions": suggestions(lrs, smoothed),
            "descent_start": descent_start(lrs, smoothed)}


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="lr-find", leave=False, disable=None if enabled else True, dynamic_ncols=True)


def _longest_descent(values: list[float]) -> tuple[int, int]:
    """(first, last) positions of the longest contiguous stretch over which `values` never rise
    (the latest among equally long ones: nearer the minimum)."""
    best = (0, 0)
    first = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] > values[i - 1]:
            if i - 1 - first >= best[1] - best[0]:
                best = (first, i - 1)
            first = i
    return best


def descent_start(lrs: list[float], smoothed: list[float]) -> float:
    """The LR where the longest descent of the smoothed loss begins: the lowest LR at which training
    clearly improves (`scheduler.start_lr: find`, the "LRMIN" of a one-cycle run); like the suggestions, read from
    the steps up to the smoothed minimum, so that it never exceeds them."""
    first, _ = _longest_descent(list(smoothed)[:int(np.argmin(smoothed)) + 1])
    return float(lrs[first])


def suggestions(lrs: list[float], smoothed: list[float]) -> dict[str, float]:
    """steepest, valley and min/10 (see the module docstring), each within [lrs[0], lrs[-1]] and read from the
    steps up to the smoothed loss's minimum."""
    lowest = int(np.argmin(np.asarray(smoothed, dtype=float)))
    lr = np.asarray(lrs, dtype=float)[:lowest + 1]
    loss = np.asarray(smoothed, dtype=float)[:lowest + 1]
    lo, hi = float(lrs[0]), float(lrs[-1])
    slope = np.gradient(loss, np.log10(lr)) if len(lr) > 1 else np.zeros(1)
    steepest = float(lr[int(np.argmin(slope))])
    first, last = _longest_descent(list(loss))
    valley = float(math.sqrt(lr[first] * lr[last]))
    minimum = float(lr[int(np.argmin(loss))])
    clip = lambda v: float(min(max(v, lo), hi))  # noqa: E731
    found = {"steepest": clip(steepest), "valley": clip(valley), "minimum": clip(minimum), "min/10": clip(minimum / 10)}
    return {name: found[name] for name in LR_SUGGESTIONS}


def lr_find(cfg: ExperimentConfig, start: float = 1e-7, end: float = 10.0, iters: int = 100,
            smooth: float = 0.98, diverge: float = 4.0, parts: Optional[RunParts] = None, optimizer=None,
            progress: bool = True) -> dict:
    """The LR range test for `cfg`: on `parts` (a `train.parts.RunParts`; built from cfg when None),
    with `optimizer` (default: `build_optimizer(model, cfg.optimizer)`, its LR set per step).

    Model, optimizer, RNG and loader epoch are restored afterwards. Returns a dict with the
    tested `lr`, raw `loss`, `smoothed` loss (one per step actually run), `steps`,
    `stopped_early`/`stop_reason`, the arguments, and `suggestions` {steepest, valley, minimum, min/10}.
    """
    _check_range(start, end, iters, smooth, diverge)
    if parts is None:
        parts = build(cfg)
    if optimizer is None:
        optimizer = build_optimizer(parts.model, cfg.optimizer)
    return range_test(parts.model, parts.train_loader, optimizer, precision=parts.precision, device=parts.device,
                      start=start, end=end, iters=iters, smooth=smooth, diverge=diverge,
                      train_cfg=cfg.train, progress=progress)


# ---------------------------------------------------------------- output


def plot(result: dict, path: str | Path, title: str = "") -> Path:
    """lr_find.png: raw and smoothed loss against the LR (log scale), suggestions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lr, loss, smoothed = result["lr"], result["loss"], result["smoothed"]
    ax.plot(lr, loss, color="0.75", linewidth=1, label="loss per batch")
    ax.plot(lr, smoothed, color="C0", linewidth=2, label="smoothed loss")
    colours = {"steepest": "C1", "valley": "C2", "minimum": "C4", "min/10": "C3"}
    for name, value in result["suggestions"].items():
        y = float(np.interp(np.log10(value), np.log10(lr), smoothed))
        ax.axvline(value, color=colours.get(name, "k"), linestyle="--", linewidth=1)
        ax.plot([value], [y], "o", color=colours.get(name, "k"), markersize=8, label=f"{name}: {value:.2e}")
    ax.set_xscale("log")
    # from the lowest batch loss (the smoothed one lags it: seed C's fell to 2.0 where the smoothed was 3.2) to
    # the start, clipped where a divergence would flatten everything else
    low, high = min(min(loss), min(smoothed)), max(smoothed[0], min(max(smoothed), 2 * smoothed[0]))
    pad = 0.05 * (high - low or 1)
    ax.set_ylim(low - pad, high + 4 * pad)
    ax.set_xlabel("learning rate (log scale)", fontsize=11)
    ax.set_ylabel("training loss", fontsize=11)
    stop = f"; stopped: {result['stop_reason']}" if result.get("stop_reason") else ""
    ax.set_title(f"{title or 'LR range test'}\n{result['steps']} steps from {result['start']:.0e} to "
                 f"{result['end']:.0e}{stop}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def write(result: dict, out: str | Path, title: str = "") -> tuple[Path, Path]:
    """lr_find.json and lr_find.png in folder `out`."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from e
    json_path = out / "lr_find.json"
    atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    return json_path, plot(result, out / "lr_find.png", title)


def describe(result: dict) -> list[str]:
    lines = [f"{name:>8}: {value:.3e}" for name, value in result["suggestions"].items()]
    if result["stopped_early"]:
        lines.append(f"stopped after {result['steps']} of {result['iters']} steps: {result['stop_reason']}")
    return lines


# ---------------------------------------------------------------- max_lr: find


def resolve_max_lr(cfg: ExperimentConfig, parts, log: Callable[[str], None] = print,
                   out: Optional[Path] = None, *, start: float = 1e-7, end: float = 10.0,
                   iters: int = 100) -> ExperimentConfig:
    """`scheduler.max_lr: find` and `scheduler.start_lr: find` -> numbers: for a OneCycle config asking
    for either, run one range test (by default 1e-7 to 10 over 100 batches) on `parts`' model and
    train loader, restoring them, and return a copy of `cfg` with max_lr the suggestion `max_lr_rule` names
    and start_lr the start of the longest descent (each only where asked). Any other config is returned
    as it is (the same object). The test's result is kept in `parts.lr_find` (the loop writes it into the
    run folder); with `out`, lr_find.json/png are written there too.
    """
    sched = cfg.scheduler
    if sched.name != "onecycle" or "find" not in (sched.max_lr, sched.start_lr):
        return cfg
    result = lr_find(cfg, start=start, end=end, iters=iters, parts=parts)
    parts.lr_find = result
    found = {}
    if sched.max_lr == "find":
        rule = sched.max_lr_rule
        found["max_lr"] = float(result["suggestions"][rule])
        others = ", ".join(f"{k} {v:.3e}" for k, v in result["suggestions"].items() if k != rule)
        log(f"lr-find: scheduler.max_lr = {found['max_lr']:.3e} ({rule} of a {result['steps']}-step "
            f"range test; {others})")
    if sched.start_lr == "find":
        found["start_lr"] = float(result["descent_start"])
        log(f"lr-find: scheduler.start_lr = {found['start_lr']:.3e} (where the longest descent of the smoothed "
            f"loss starts, in the same {result['steps']}-step range test)")
    if out is not None:
        write(result, out, f"{cfg.name}: LR range test")
    return dataclasses.replace(cfg, scheduler=dataclasses.replace(sched, **found))
