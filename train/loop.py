"""The training loop: channels_last model, autocast, one optimizer step per batch.

Hand-written (as airbench and nanoGPT do) because the loop is where the
tricks live and must stay readable: every step is named below. Metrics are
accumulated on the device and read once per progress update, so CUDA never
waits on the host in the middle of an epoch.

Under torchrun the model is wrapped in DDP, each rank trains on its share of
every global batch, metric sums are all-reduced, and only rank 0 writes.
SIGINT/SIGTERM finish the current batch, save a mid-epoch checkpoint and stop;
`--resume` continues from that batch and ends exactly where an uninterrupted
run would (augmentations and order are functions of (seed, epoch, index)).
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from beton.errors import Interrupted, UserError
from beton.manifest import read_manifest
from fastloader.loaders import build_loaders

from . import checkpoint, distributed
from .config import ExperimentConfig
from .hardware import Precision, resolve_device, resolve_precision
from .lr_find import resolve_max_lr
from .models import count_parameters, create_model
from .optim import build_optimizer, build_schedule
from .run import RunDir

PROGRESS_EVERY = 10  # batches between progress-bar updates (each reads the loss back from the device)


class Diverged(UserError):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays."""


class StopRequest:
    """SIGINT/SIGTERM -> stop at the next batch boundary (a second Ctrl-C stops at once).

    A handler only sets a flag: stopping mid-step could save a model whose
    optimizer step was half applied.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.signum: int | None = None
        self.quiet = quiet
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: stopping after this batch (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None


@dataclass
class Pass:
    """Loss and accuracy of one pass over a split."""

    loss: float
    correct: int
    count: int
    seconds: float

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / max(self.count, 1)


@dataclass
class Progress:
    """Running sums of a training epoch; `batch` batches are done. A mid-epoch checkpoint stores them."""

    lr: float  # at the start of the epoch (its metrics line reports it)
    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int = 0
    batch: int = 0
    seconds: float = 0.0

    @classmethod
    def start(cls, lr: float, device: torch.device, saved: dict | None = None) -> "Progress":
        p = cls(lr, torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))
        if saved:
            p.loss_sum.fill_(float(saved["loss_sum"]))  # float32 -> float -> float32: exact
            p.correct.fill_(int(saved["correct"]))
            p.count, p.batch, p.seconds = int(saved["count"]), int(saved["batch"]), float(saved["seconds"])
            p.lr = float(saved["lr"])
        return p

    def state(self) -> dict:
        return {"lr": self.lr, "loss_sum": self.loss_sum.item(), "correct": int(self.correct.item()),
                "count": self.count, "batch": self.batch, "seconds": self.seconds}

    def _sums(self, device: torch.device) -> tuple[float, int, int]:
        """Loss sum, correct and count over all ranks."""
        loss_sum, correct, count = distributed.all_sum([self.loss_sum.item(), self.correct.item(), self.count], device)
        return loss_sum, int(correct), int(count)

    def global_state(self, device: torch.device, running: float = 0.0) -> dict:
        """state() with every rank's sums, for a mid-epoch checkpoint (rank 0 writes it; on resume rank 0
        starts from these sums, the others from zero). `running`: seconds of this epoch not yet added."""
        loss_sum, correct, count = self._sums(device)
        return {**self.state(), "loss_sum": loss_sum, "correct": correct, "count": count,
                "seconds": self.seconds + running}

    def summed(self, device: torch.device) -> Pass:
        """The pass over the whole epoch: sums over all ranks."""
        loss_sum, correct, count = self._sums(device)
        return Pass(loss_sum / max(count, 1), correct, count, self.seconds)


@dataclass
class Setup:
    """Everything a run needs, built from its config (shared by train, lr-find and bench)."""

    cfg: ExperimentConfig
    device: torch.device
    precision: Precision
    model: torch.nn.Module
    train_loader: object
    test_loader: object
    classes: list
    world: distributed.World = field(default_factory=distributed.World)


def build(cfg: ExperimentConfig, device: torch.device | None = None) -> Setup:
    device = device or resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    manifest = read_manifest(cfg.data.folder())
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = create_model(cfg.model, num_classes=len(manifest["classes"]))
    if cfg.model.sync_bn:
        model = distributed.sync_batchnorm(model, device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    train_loader, test_loader = build_loaders(cfg.data, device, precision.batch_dtype)
    return Setup(cfg, device, precision, model, train_loader, test_loader, list(manifest["classes"]),
                 distributed.current())


def train_epoch(s: Setup, model, optimizer, schedule, scaler, epoch: int, bar_desc: str,
                stop: StopRequest | None = None, saved: dict | None = None, every: int = 0,
                save_partial: Callable[[Progress, float], None] | None = None) -> Progress:
    """One epoch (from batch `saved["batch"]` when resuming mid-epoch); ends early on a stop request.

    `save_partial(progress, seconds_running)` runs after every `every`-th batch (mid-epoch checkpoints).
    """
    model.train()
    p = Progress.start(schedule.lr, s.device, saved)
    clip = s.cfg.train.grad_clip
    s.train_loader.set_epoch(epoch)
    n, world = len(s.train_loader), s.world
    bar = tqdm(total=n, initial=p.batch, desc=bar_desc, leave=False, disable=None if world.main else True,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(s.train_loader):
        if step < p.batch:  # done before the interruption: same order and augmentations, so skip
            continue
        with s.precision.autocast(s.device):
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=s.cfg.train.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 on CUDA: scale the loss so small gradients survive
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        schedule.after_batch()
        p.loss_sum += loss.detach().float() * len(labels)
        p.correct += (logits.argmax(1) == labels).sum()
        p.count += len(labels)
        p.batch = step + 1
        report = p.batch % PROGRESS_EVERY == 0 or p.batch == n
        if report and world.main:
            mean_loss = p.loss_sum.item() / p.count
            if not math.isfinite(mean_loss) and not world.active:  # distributed: checked on the summed epoch
                bar.close()
                raise Diverged(f"loss became {mean_loss} at epoch {epoch + 1}, batch {p.batch}; "
                               f"stopping (the last good checkpoint, if any, is kept)")
            elapsed = p.seconds + time.perf_counter() - start
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{100 * p.correct.item() / p.count:.2f}%",
                            lr=f"{schedule.lr:.2e}", img_s=f"{p.count * world.size / elapsed:,.0f}", refresh=False)
        bar.update(1)
        if stop is not None and p.batch < n and (report if world.active else True):
            # distributed: every rank must stop after the same batch, so they agree (every few batches)
            if distributed.any_rank(stop.requested, s.device):
                break
        if save_partial is not None and every and p.batch % every == 0 and p.batch < n:
            save_partial(p, time.perf_counter() - start)
    bar.close()
    p.seconds += time.perf_counter() - start
    return p


@torch.no_grad()
def evaluate(s: Setup, model, loader=None) -> Pass:
    """Loss and accuracy over the (test) loader; distributed: each rank its shard, sums all-reduced."""
    model.eval()
    loader = loader or s.test_loader
    loss_sum = torch.zeros((), device=s.device)
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    count, start = 0, time.perf_counter()
    for images, labels in loader:
        with s.precision.autocast(s.device):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    loss_sum, correct, count = distributed.all_sum([loss_sum.item(), correct.item(), count], s.device)
    return Pass(loss_sum / max(count, 1), int(correct), int(count), time.perf_counter() - start)


def _metrics_line(epoch: int, lr: float, train: Pass, test: Pass) -> dict:
    """What the epoch learned: a pure function of config and seed, so reruns give identical lines."""
    return {"epoch": epoch, "lr": lr, "train_loss": round(train.loss, 6), "train_acc": round(train.acc, 4),
            "test_loss": round(test.loss, 6), "test_acc": round(test.acc, 4), "test_correct": test.correct,
            "test_count": test.count}


def _timing_line(epoch: int, train: Pass, test: Pass, world: int) -> dict:
    """How long it took (timing.jsonl): kept apart from metrics.jsonl, which must not vary between reruns."""
    return {"epoch": epoch, "seconds": round(train.seconds + test.seconds, 3),
            "images_per_s": round(train.count / max(train.seconds, 1e-9), 1), "processes": world}


def summary_line(m: dict, t: dict, epochs: int) -> str:
    """One line per epoch, as the seeds' logs have it."""
    return (f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2f}%  |  "
            f"Test set: Average loss: {m['test_loss']:.4f}, Accuracy: {m['test_correct']}/{m['test_count']} "
            f"({m['test_acc']:.2f}%)  |  lr {m['lr']:.3e}  |  {t['seconds']:.1f} s ({t['images_per_s']:,.0f} img/s)")


def fit(cfg: ExperimentConfig, run: RunDir, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Train `cfg` into `run`; with `resume`, continue from run's last checkpoint exactly.

    `stop_after`: end after that epoch (checkpointed), as if interrupted there.
    Under torchrun, every rank calls this; only rank 0 writes `run`.
    """
    world, device = distributed.setup(resolve_device(cfg.train.device), cfg.train.dist_timeout)
    try:
        return _fit(cfg, run, resume, stop_after, device)
    except Exception as e:
        if world.active and not isinstance(e, UserError) and distributed.is_lost_peer(e):
            distributed.mark_broken()
            raise distributed.Lost(f"rank {world.rank}: another process failed or stopped answering, so this one "
                                   f"stops too ({distributed.reason(e)}); the last checkpoint is kept") from e
        raise


def _fit(cfg: ExperimentConfig, run: RunDir, resume: bool, stop_after: int | None, device) -> list[dict]:
    s = build(cfg, device)
    world = s.world
    found: list[str] = []
    if not resume:  # `max_lr: find`: a range test first; config.yaml then stores the number, so resume needs none
        cfg = s.cfg = distributed.from_main(resolve_max_lr(cfg, s, log=found.append), device)
    model = s.model
    optimizer = build_optimizer(model, cfg.optimizer)
    schedule = build_schedule(optimizer, cfg.scheduler, cfg.train.epochs, len(s.train_loader), cfg.optimizer.lr)
    # after every check: a failed start leaves no run folder behind
    distributed.on_main(lambda: run.create(cfg.to_dict(), resume), device)
    log = run.log if world.main else (lambda line: None)
    for line in found:
        log(line)
    scaler = s.precision.scaler(s.device)
    ddp = distributed.wrap(model, device)
    step_model = torch.compile(ddp) if cfg.train.compile else ddp
    eval_model = step_model if not world.active else (torch.compile(model) if cfg.train.compile else model)
    history, timing, best_acc, start_epoch, saved = [], [], -1.0, 0, None
    if resume:
        state = checkpoint.load(run.last)  # on the CPU: RNG states must stay CPU tensors
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            checkpoint.set_rng_state(state["rng"])
            history, best_acc, start_epoch = list(state["history"]), float(state["best_acc"]), int(state["epoch"])
            timing, saved = list(state.get("timing") or []), state.get("partial")
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"{run.last} does not fit this run's config ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'missing data'})") from e
        if saved and not world.main:  # rank 0's saved sums already hold every rank's share
            saved = {**saved, "loss_sum": 0.0, "correct": 0, "count": 0}
        if world.main:
            _record(run, cfg, model, history, timing)  # a crash may have left them behind the checkpoint
        where = f"epoch {start_epoch + 1}, batch {saved['batch']}" if saved else f"epoch {start_epoch}"
        log(f"resumed {run.path} after {where} of {cfg.train.epochs}")
    else:
        log(f"run {cfg.name}: {cfg.model.name} ({cfg.model.norm} norm), {count_parameters(model):,} parameters, "
            f"{cfg.optimizer.name} + {cfg.scheduler.name}, {cfg.train.epochs} epochs, batch {cfg.data.batch_size}"
            f"{f' over {world.size} processes' if world.active else ''}, {s.precision.name} on {s.device}; "
            f"{s.train_loader.num_samples:,} train / {s.test_loader.num_samples:,} test images")
    board = _board(run, start_epoch) if world.main else None

    def snapshot(epochs_done: int, partial: dict | None = None) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": checkpoint.rng_state(),
                "epoch": epochs_done, "history": history, "timing": timing, "best_acc": best_acc,
                "config": cfg.to_dict(), "partial": partial}

    def save_partial(epochs_done: int, progress: Progress, running: float = 0.0) -> None:
        """A mid-epoch checkpoint: resume continues after `progress.batch` batches of the next epoch."""
        partial = progress.global_state(device, running)
        distributed.on_main(lambda: checkpoint.save(run.last, snapshot(epochs_done, partial)), device)

    def stop_here(epochs_done: int, progress: Progress | None) -> None:
        """Save a resumable checkpoint (mid-epoch; at an epoch's end it is saved already) and stop."""
        if progress is not None:
            save_partial(epochs_done, progress)
        where = f"epoch {epochs_done + 1}, batch {progress.batch}" if progress else f"epoch {epochs_done}"
        message = f"interrupted: checkpoint saved after {where}; continue with: fastcifar train --resume {run.path}"
        if world.main:
            run.log(message, echo=False)  # the CLI prints it, on stderr
        raise Interrupted(message if world.main else "")  # said once, by rank 0

    last_epoch = min(cfg.train.epochs, stop_after or cfg.train.epochs)
    with StopRequest(quiet=not world.main) as stop:
        for epoch in range(start_epoch, last_epoch):
            progress = train_epoch(s, step_model, optimizer, schedule, scaler, epoch,
                                   f"epoch {epoch + 1}/{cfg.train.epochs}", stop, saved, cfg.train.checkpoint_every,
                                   lambda p, running, epoch=epoch: save_partial(epoch, p, running))
            saved = None
            if progress.batch < len(s.train_loader):
                stop_here(epoch, progress)
            distributed.broadcast_buffers(model)  # BatchNorm statistics: rank 0's on every rank
            train = progress.summed(device)
            if not math.isfinite(train.loss):
                raise Diverged(f"loss became {train.loss} in epoch {epoch + 1}; stopping "
                               f"(the last good checkpoint, if any, is kept)")
            test = evaluate(s, eval_model)
            schedule.after_epoch(test.loss)
            metrics = _metrics_line(epoch + 1, progress.lr, train, test)
            times = _timing_line(epoch + 1, train, test, world.size)
            history.append(metrics)
            timing.append(times)
            improved = test.acc > best_acc
            best_acc = max(best_acc, test.acc)

            def write(improved=improved, metrics=metrics, times=times) -> None:
                state = snapshot(metrics["epoch"])
                if improved:  # best before last: a crash between the two re-runs this epoch and rewrites both
                    checkpoint.save(run.best, state)
                checkpoint.save(run.last, state)
                _record(run, cfg, model, history, timing)
                run.log(summary_line(metrics, times, cfg.train.epochs))
                for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc"):
                    board.add_scalar(key, metrics[key], metrics["epoch"])
                board.add_scalar("images_per_s", times["images_per_s"], metrics["epoch"])
                board.flush()

            distributed.on_main(write, device)
            if epoch + 1 < last_epoch and distributed.any_rank(stop.requested, device):
                stop_here(epoch + 1, None)
    if board is not None:
        board.close()
    return history


def _record(run: RunDir, cfg: ExperimentConfig, model, history: list[dict], timing: list[dict]) -> None:
    """metrics.jsonl, timing.jsonl and summary.json from the history (the checkpoint's, on resume)."""
    run.write_metrics(history)
    run.write_timing(timing)
    if history:
        run.write_summary(_summary(cfg, model, history, timing))


def _summary(cfg: ExperimentConfig, model, history: list[dict], timing: list[dict]) -> dict:
    """What a results table needs of a run, without loading its checkpoint."""
    best = max(history, key=lambda m: m["test_acc"])
    last = history[-1]
    return {"name": cfg.name, "model": cfg.model.name, "norm": cfg.model.norm, "scheduler": cfg.scheduler.name,
            "optimizer": cfg.optimizer.name, "params": count_parameters(model), "epochs": cfg.train.epochs,
            "epochs_done": last["epoch"], "complete": last["epoch"] >= cfg.train.epochs,
            "train_acc": last["train_acc"], "test_acc": last["test_acc"], "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"], "seconds": round(sum(t["seconds"] for t in timing), 1)}


def _board(run: RunDir, start_epoch: int):
    """TensorBoard events in run/tb; on resume, events past the checkpoint are dropped."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run.path / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
