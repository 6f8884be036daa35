"""The training loop: channels_last model, autocast, one optimizer step per batch.

Hand-written (as airbench and nanoGPT do) because the loop is where the
tricks live and must stay readable: every step is named below. Metrics are
accumulated on the device and read once per progress update, so CUDA never
waits on the host in the middle of an epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from beton.errors import UserError
from beton.manifest import read_manifest
from fastloader.loaders import build_loaders

from . import checkpoint
from .config import ExperimentConfig
from .hardware import Precision, resolve_device, resolve_precision
from .lr_find import resolve_max_lr
from .models import count_parameters, create_model
from .optim import build_optimizer, build_schedule
from .run import RunDir

PROGRESS_EVERY = 10  # batches between progress-bar updates (each reads the loss back from the device)


class Diverged(UserError):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays."""


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
class Setup:
    """Everything a run needs, built from its config (shared by train, lr-find and bench)."""

    cfg: ExperimentConfig
    device: torch.device
    precision: Precision
    model: torch.nn.Module
    train_loader: object
    test_loader: object
    classes: list


def build(cfg: ExperimentConfig) -> Setup:
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    manifest = read_manifest(cfg.data.folder())
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model, num_classes=len(manifest["classes"]))
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    train_loader, test_loader = build_loaders(cfg.data, device, precision.batch_dtype)
    return Setup(cfg, device, precision, model, train_loader, test_loader, list(manifest["classes"]))


def train_epoch(s: Setup, model, optimizer, schedule, scaler, epoch: int, bar_desc: str) -> Pass:
    model.train()
    loss_sum = torch.zeros((), device=s.device)
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    count, start = 0, time.perf_counter()
    clip = s.cfg.train.grad_clip
    s.train_loader.set_epoch(epoch)
    bar = tqdm(total=len(s.train_loader), desc=bar_desc, leave=False, disable=None, dynamic_ncols=True)
    for step, (images, labels) in enumerate(s.train_loader):
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
        loss_sum += loss.detach().float() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
        if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == len(s.train_loader):
            mean_loss = loss_sum.item() / count
            if not math.isfinite(mean_loss):
                bar.close()
                raise Diverged(f"loss became {mean_loss} at epoch {epoch + 1}, batch {step + 1}; "
                               f"stopping (the last good checkpoint, if any, is kept)")
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{100 * correct.item() / count:.2f}%",
                            lr=f"{schedule.lr:.2e}", img_s=f"{count / elapsed:,.0f}", refresh=False)
        bar.update(1)
    bar.close()
    return Pass(loss_sum.item() / max(count, 1), int(correct.item()), count, time.perf_counter() - start)


@torch.no_grad()
def evaluate(s: Setup, model, loader=None) -> Pass:
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
    return Pass(loss_sum.item() / max(count, 1), int(correct.item()), count, time.perf_counter() - start)


def _metrics_line(epoch: int, lr: float, train: Pass, test: Pass) -> dict:
    return {"epoch": epoch, "lr": lr, "train_loss": round(train.loss, 6), "train_acc": round(train.acc, 4),
            "test_loss": round(test.loss, 6), "test_acc": round(test.acc, 4), "test_correct": test.correct,
            "test_count": test.count, "seconds": round(train.seconds + test.seconds, 3),
            "images_per_s": round(train.count / max(train.seconds, 1e-9), 1)}


def summary_line(m: dict, epochs: int) -> str:
    """One line per epoch, as the seeds' logs have it."""
    return (f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2f}%  |  "
            f"Test set: Average loss: {m['test_loss']:.4f}, Accuracy: {m['test_correct']}/{m['test_count']} "
            f"({m['test_acc']:.2f}%)  |  lr {m['lr']:.3e}  |  {m['seconds']:.1f} s ({m['images_per_s']:,.0f} img/s)")


def fit(cfg: ExperimentConfig, run: RunDir, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Train `cfg` into `run`; with `resume`, continue from run's last checkpoint exactly.

    `stop_after`: end after that epoch (checkpointed), as if interrupted there.
    """
    s = build(cfg)
    found: list[str] = []
    if not resume:  # `max_lr: find`: a range test first; config.yaml then stores the number, so resume needs none
        cfg = s.cfg = resolve_max_lr(cfg, s, log=found.append)
    model = s.model
    optimizer = build_optimizer(model, cfg.optimizer)
    schedule = build_schedule(optimizer, cfg.scheduler, cfg.train.epochs, len(s.train_loader), cfg.optimizer.lr)
    run.create(cfg.to_dict(), resume)  # after every check: a failed start leaves no run folder behind
    for line in found:
        run.log(line)
    scaler = s.precision.scaler(s.device)
    step_model = torch.compile(model) if cfg.train.compile else model
    history, best_acc, start_epoch = [], -1.0, 0
    if resume:
        state = checkpoint.load(run.last)  # on the CPU: RNG states must stay CPU tensors
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        history, best_acc, start_epoch = list(state["history"]), float(state["best_acc"]), int(state["epoch"])
        _record(run, cfg, model, history)  # a crash may have left them behind the checkpoint
        run.log(f"resumed {run.path} after epoch {start_epoch}/{cfg.train.epochs}")
    else:
        run.log(f"run {cfg.name}: {cfg.model.name} ({cfg.model.norm} norm), {count_parameters(model):,} parameters, "
                f"{cfg.optimizer.name} + {cfg.scheduler.name}, {cfg.train.epochs} epochs, batch {cfg.data.batch_size}, "
                f"{s.precision.name} on {s.device}; {s.train_loader.num_samples:,} train / "
                f"{s.test_loader.num_samples:,} test images")
    board = _board(run, start_epoch)
    for epoch in range(start_epoch, min(cfg.train.epochs, stop_after or cfg.train.epochs)):
        lr = schedule.lr
        train = train_epoch(s, step_model, optimizer, schedule, scaler, epoch, f"epoch {epoch + 1}/{cfg.train.epochs}")
        test = evaluate(s, step_model)
        schedule.after_epoch(test.loss)
        metrics = _metrics_line(epoch + 1, lr, train, test)
        history.append(metrics)
        improved = test.acc > best_acc
        best_acc = max(best_acc, test.acc)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "rng": checkpoint.rng_state(),
                 "epoch": epoch + 1, "history": history, "best_acc": best_acc, "config": cfg.to_dict()}
        if improved:  # best before last: a crash between the two re-runs this epoch and rewrites both
            checkpoint.save(run.best, state)
        checkpoint.save(run.last, state)
        _record(run, cfg, model, history)
        run.log(summary_line(metrics, cfg.train.epochs))
        for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s"):
            board.add_scalar(key, metrics[key], epoch + 1)
        board.flush()
    board.close()
    return history


def _record(run: RunDir, cfg: ExperimentConfig, model, history: list[dict]) -> None:
    """metrics.jsonl and summary.json from the history (the checkpoint's, on resume)."""
    run.write_metrics(history)
    if history:
        run.write_summary(_summary(cfg, model, history))


def _summary(cfg: ExperimentConfig, model, history: list[dict]) -> dict:
    """What a results table needs of a run, without loading its checkpoint."""
    best = max(history, key=lambda m: m["test_acc"])
    last = history[-1]
    return {"name": cfg.name, "model": cfg.model.name, "norm": cfg.model.norm, "scheduler": cfg.scheduler.name,
            "optimizer": cfg.optimizer.name, "params": count_parameters(model), "epochs": cfg.train.epochs,
            "epochs_done": last["epoch"], "complete": last["epoch"] >= cfg.train.epochs,
            "train_acc": last["train_acc"], "test_acc": last["test_acc"], "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"], "seconds": round(sum(m["seconds"] for m in history), 1)}


def _board(run: RunDir, start_epoch: int):
    """TensorBoard events in run/tb; on resume, events past the checkpoint are dropped."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run.path / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
