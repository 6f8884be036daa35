"""The training loop: start or resume, then for each epoch train, evaluate, record.

Read it top to bottom: `fit` is the story, `train_epoch` and `evaluate` are the two passes.
One optimizer step is `step.train_step` (shared with the LR range test and the benchmarks); what
surrounds the story lives beside it in named pieces: `parts.build` (model, loaders, precision),
`state.start_training` (optimizer, schedule, step), `record.Recorder` (run folder, checkpoints, metrics,
TensorBoard), `distributed` (agreement between ranks), `stop.StopRequest` (Ctrl-C).

Metrics are accumulated on the device and read once per progress update, so CUDA never waits on
the host in the middle of an epoch. Under torchrun the step's model is DDP-wrapped, each rank
trains on its share of every global batch, sums are all-reduced, and only rank 0 writes.
SIGINT/SIGTERM finish the current batch, save a mid-epoch checkpoint and stop; `--resume`
continues from that batch and ends exactly where an uninterrupted run would (augmentations and
order are functions of (seed, epoch, index)).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from beton.errors import UserError

from . import distributed
from .config import ExperimentConfig
from .hardware import resolve_device
from .lr_find import resolve_max_lr, write as write_lr_find
from .metrics import Pass, Progress, metrics_line, monitored, timing_line
from .record import Recorder
from .run import RunDir
from .parts import RunParts, build
from .budget import budget_use, correctable, corrected, resolve_budget
from .state import Training, start_training
from .step import train_step
from .stop import StopRequest, check, handling
from .tta import eval_logits

PROGRESS_EVERY = 10  # batches between progress-bar updates (each reads the loss back from the device)


class Diverged(UserError):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays."""


def fit(cfg: ExperimentConfig, run: RunDir, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Train `cfg` into `run`; with `resume`, continue from run's last checkpoint exactly.

    `stop_after`: end after that epoch (checkpointed), as if interrupted there.
    A stop request raises `Interrupted` after set-up, a batch or an epoch; one made during the last
    epoch's evaluation is left to the caller, the run being complete (`train` and `sweep` check it).
    Under torchrun, every rank calls this; only rank 0 writes `run`.
    """
    started = time.perf_counter()
    # a stop request is honoured at the boundaries below (every rank agreeing), never mid-step or mid-collective
    with handling(quiet=not distributed.launched().main) as stop, stop.deferred():
        world, device = distributed.setup(resolve_device(cfg.train.device), cfg.train.dist_timeout)
        try:
            return _fit(cfg, run, resume, stop_after, device, started)
        except Exception as e:
            if world.active and not isinstance(e, UserError) and distributed.is_lost_peer(e):
                distributed.mark_broken()
                raise distributed.Lost(f"rank {world.rank}: another process failed or stopped answering, so this "
                                       f"one stops too ({distributed.reason(e)}); the last checkpoint is kept") from e
            raise


def _fit(cfg: ExperimentConfig, run: RunDir, resume: bool, stop_after: int | None, device,
         started: float) -> list[dict]:
    # 1. Model, loaders, precision; what the config leaves to measurement becomes numbers
    parts = build(cfg, device)
    if not resume:
        resolve_at_start(parts, started)  # the LR range test ends early on a stop request
    check("during set-up, before training started; nothing new was written")
    training = start_training(parts)
    parts.notes.append(startup_line(parts.startup, time.perf_counter() - started))
    rec = Recorder(run, parts)
    rec.open(resume)
    saved = rec.load(training) if resume else None  # a checkpoint that cannot be read stops here, nothing written
    if resume:
        rec.keep_config()  # a continued run may run differently (config.RUN_SETTINGS): config.yaml says how
    if parts.lr_find is not None and parts.world.main:  # the range test `max_lr: find` ran, beside its numbers
        write_lr_find(parts.lr_find, run.path, f"{parts.cfg.name}: LR range test")
    for line in parts.notes:
        rec.log(line)

    # 2. Start, or continue from the last checkpoint (mid-epoch if it was saved there)
    if resume:
        rec.resume(training, saved)
    else:
        rec.begin(training)

    # 3. The epochs (train.budget may correct their number once, after the first)
    def last_epoch() -> int:  # train.epochs with a fraction: its last epoch trains part of the loader
        return min(parts.cfg.train.loop_epochs, stop_after or parts.cfg.train.loop_epochs)

    with handling(quiet=not parts.world.main) as stop:  # fit installed it: the same request
        epoch = training.epoch
        while epoch < last_epoch():
            training.begin_epoch(epoch, parts.cfg)
            progress = train_epoch(parts, training, epoch, stop, saved,
                                   lambda so_far, running: rec.save_partial(training, epoch, so_far, running))
            saved = None
            if progress.batch < parts.cfg.train.epoch_batches(epoch, len(parts.train_loader)):  # stopped mid-epoch
                raise rec.interrupted(training, epoch, progress)
            distributed.broadcast_buffers(training.model)  # BatchNorm statistics: rank 0's on every rank
            train = progress.summed(device)
            if not math.isfinite(train.loss):
                raise Diverged(f"loss became {train.loss} in epoch {epoch + 1}; stopping "
                               f"(the last good checkpoint, if any, is kept)")
            tta = not parts.cfg.eval.tta_last_only or epoch + 1 == parts.cfg.train.loop_epochs
            with training.evaluation() as model:  # the averaged weights with train.ema_decay
                test = evaluate(parts, model, tta=tta)
                val = evaluate(parts, model, parts.val_loader, tta=tta) if parts.val_loader is not None else None
            watched = monitored(test, val)
            training.schedule.after_epoch(watched)
            used = parts.cfg.eval.tta if tta and parts.cfg.eval.tta != "none" else None
            training.history.append(metrics_line(epoch + 1, progress.lr, train, test, val, tta=used))
            training.timing.append(timing_line(epoch + 1, train=train, test=test, world=parts.world.size, val=val))
            if epoch == 0 and not resume and correctable(parts.cfg):  # what the first epoch took corrects the plan
                correct_plan(parts, training, rec, started)
            # train.select_best_on: the split whose accuracy picks the best checkpoint
            chosen = watched[f"{parts.cfg.train.select_best_on}_acc"]
            improved = chosen > training.best_acc
            training.best_acc = max(training.best_acc, chosen)
            rec.epoch_end(training, improved)
            if epoch + 1 < last_epoch() and distributed.any_rank(stop.requested, device):
                raise rec.interrupted(training, epoch + 1, None)
            epoch += 1
    if parts.cfg.train.budget_plan is not None and epoch == parts.cfg.train.loop_epochs:  # a budgeted run's last word
        rec.log("train.budget: " + budget_use(parts.cfg.train.budget_plan, training.timing))
    rec.close()
    return training.history


def correct_plan(parts: RunParts, training: Training, rec: Recorder, started: float) -> None:
    """train.budget, after the first epoch: the epochs that fit what is left at the pace that epoch showed
    (rank 0's numbers on every rank). A changed plan goes into config.yaml before the epoch's checkpoint, so a
    resume builds the same schedule; the schedule continues from this step (`Training.follow`)."""
    timing = training.timing[-1]
    cfg, line = distributed.from_main(
        corrected(parts.cfg, time.perf_counter() - started, timing["train_seconds"], timing["eval_seconds"]),
        parts.device)
    rec.log(line)
    if cfg != parts.cfg:
        parts.cfg = cfg
        rec.rewrite_config()
        training.follow(cfg, len(parts.train_loader))


def resolve_at_start(parts: RunParts, started: float) -> None:
    """`max_lr: find` (an LR range test) and `train.budget` (timed steps) become numbers in `parts.cfg`, which
    config.yaml stores: resume and reruns need neither. Every rank measures, in step with the others (the
    range test stops on the loss averaged over ranks, the budget times the same number of steps on each), so
    SyncBatchNorm's collectives run on all ranks alike; every rank takes rank 0's numbers."""
    begin = time.perf_counter()
    found = distributed.from_main(resolve_max_lr(parts.cfg, parts, log=parts.notes.append), parts.device)
    if found.scheduler != parts.cfg.scheduler:  # `find` became numbers
        parts.startup["LR range test"] = time.perf_counter() - begin
    parts.cfg, begin = found, time.perf_counter()
    cfg, line = distributed.from_main(resolve_budget(parts, started), parts.device)
    parts.cfg = cfg
    if line:
        parts.notes.append(line)
        parts.startup["budget probe"] = time.perf_counter() - begin


def startup_line(phases: dict, total: float) -> str:
    """The train.log line of what came before the first epoch: `total` seconds since `fit` began (the
    process's imports are before it), each named phase of `phases`, and the rest."""
    named = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
    rest = max(0.0, total - sum(phases.values()))
    return f"start-up {total:.1f} s before the first epoch: {named}, the rest {rest:.1f} s"


def train_epoch(parts: RunParts, training: Training, epoch: int, stop: StopRequest | None = None,
                saved: dict | None = None, save_partial: Callable[[Progress, float], None] | None = None) -> Progress:
    """One epoch (from batch `saved["batch"]` when resuming mid-epoch), its first `train.epoch_batches` batches
    (all but in a fractional last epoch); ends early on a stop request.

    `save_partial(progress, seconds_running)` runs after every `train.checkpoint_every`-th batch.
    """
    training.step.model.train()
    progress = Progress.start(training.schedule.lr, parts.device, saved)
    every = parts.cfg.train.checkpoint_every
    parts.train_loader.set_epoch(epoch)
    n, world = parts.cfg.train.epoch_batches(epoch, len(parts.train_loader)), parts.world
    bar = tqdm(total=n, initial=progress.batch, desc=f"epoch {epoch + 1}/{parts.cfg.train.loop_epochs}", leave=False,
               disable=None if world.main else True, dynamic_ncols=True)
    start_time = time.perf_counter()
    for index, (images, labels) in enumerate(parts.train_loader):
        if index == n:  # a fractional last epoch ends here (the loader's epoch closes)
            break
        if index < progress.batch:  # done before the interruption: same order and augmentations, so skip
            continue
        loss, logits = train_step(training.step, images, labels)
        progress.add(loss, logits, labels)
        report = progress.batch % PROGRESS_EVERY == 0 or progress.batch == n
        if report and world.main:
            mean_loss = progress.loss_sum.item() / progress.count
            if not math.isfinite(mean_loss) and not world.active:  # distributed: checked on the summed epoch
                bar.close()
                raise Diverged(f"loss became {mean_loss} at epoch {epoch + 1}, batch {progress.batch}; "
                               f"stopping (the last good checkpoint, if any, is kept)")
            elapsed = progress.seconds + time.perf_counter() - start_time
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{100 * progress.correct.item() / progress.count:.2f}%",
                            lr=f"{training.schedule.lr:.2e}", img_s=f"{progress.count * world.size / elapsed:,.0f}",
                            refresh=False)
        bar.update(1)
        if stop is not None and progress.batch < n and (report if world.active else True):
            # distributed: every rank must stop after the same batch, so they agree (every few batches)
            if distributed.any_rank(stop.requested, parts.device):
                break
        if save_partial is not None and every and progress.batch % every == 0 and progress.batch < n:
            save_partial(progress, time.perf_counter() - start_time)
    bar.close()
    progress.seconds += time.perf_counter() - start_time
    return progress


@torch.no_grad()
def evaluate(parts: RunParts, model, loader=None, tta: bool = True) -> Pass:
    """Loss and accuracy over the (test) loader, with the `eval:` section's test-time augmentation;
    distributed: each rank its shard, sums all-reduced."""
    model.eval()
    loader = loader or parts.test_loader
    loss_sum = torch.zeros((), device=parts.device)
    correct = torch.zeros((), device=parts.device, dtype=torch.long)
    count, start_time = 0, time.perf_counter()
    for images, labels in loader:
        with parts.precision.autocast(parts.device):
            logits = eval_logits(model, images, parts.cfg.eval if tta else None)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    loss_sum, correct, count = distributed.all_sum([loss_sum.item(), correct.item(), count], parts.device)
    return Pass(loss_sum / max(count, 1), int(correct), int(count), time.perf_counter() - start_time)
