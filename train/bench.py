"""`fastcifar bench train`: training images/s by memory format and precision, and what loading costs.

Every figure times `step.train_step`, the training loop's own step, on the config's model and batch:
- fp32_nchw, fp32_channels_last, bf16_channels_last: one synthetic batch, a fresh copy of the model
  each; `auto` is what `precision: auto` resolves to on this machine (the faster of the last two on
  the CPU, measured here rather than read from the cache); `channels_last_autocast` is the run's
  precision (the config's, `auto` resolved), kept for scripts that read it;
- compiled (with --compile): the run's precision under `torch.compile`, compile time apart;
- loop_real_loader vs loop_synthetic: `loop.train_epoch` itself over the real loader, and over one
  batch already in memory served as many times; their ratio is the loop efficiency (1.0: data
  loading costs nothing).
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Iterator

import torch

from .config import ExperimentConfig, SchedulerConfig
from .hardware import resolve_precision, reusing_freed_memory
from .loop import train_epoch
from .optim import build_optimizer
from .parts import build
from .precision import chosen_precision, rate, step_rate, synthetic_batch
from .state import start_training
from .step import Step


class _Repeat:
    """One in-memory batch served `n` times: a `parts.BatchLoader` without loading."""

    def __init__(self, batch, n: int):
        self.batch, self.n, self.num_samples = batch, n, n * len(batch[1])

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator:
        for _ in range(self.n):
            yield self.batch


class _Limited:
    """The first `n` batches of a loader's epoch (the real data path, bounded for a benchmark)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, min(n, len(loader))
        self.num_samples = self.n * loader.batch_size

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.loader):
            if i == self.n:
                break
            yield batch


def loop_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """What the benchmark trains: `cfg`'s model, data, optimizer and precision for one epoch at a constant LR
    and eager. The scheduler section is the default one named "none", not `cfg`'s renamed: keys that only
    the config's own schedule accepts (start_lr, role_epochs) would make the derived config invalid. Made
    before anything is timed, so a config it cannot run fails at once."""
    return replace(cfg, scheduler=SchedulerConfig(name="none"),
                   train=replace(cfg.train, epochs=1, compile=False, budget=None))


def run(cfg: ExperimentConfig, steps: int, compile: bool = False) -> dict:
    parts = build(loop_config(cfg))
    cfg = parts.cfg
    device, n, classes = parts.device, cfg.data.batch_size, len(parts.classes)
    results = {"model": cfg.model.name, "batch_size": n, "device": str(device), "threads": torch.get_num_threads(),
               "reuse_memory": reusing_freed_memory()}
    for key, name, channels_last in (("fp32_nchw", "fp32", False), ("fp32_channels_last", "fp32", True),
                                     ("bf16_channels_last", "bf16", True)):
        results[key] = rate(parts.model, cfg.optimizer, precision=resolve_precision(name, device), device=device,
                            batch=n, classes=classes, steps=steps, channels_last=channels_last)
    results["auto"] = chosen_precision(device, {"fp32": results["fp32_channels_last"],
                                                "bf16": results["bf16_channels_last"]})
    results["precision"] = parts.precision.name
    results["channels_last_autocast"] = (results["fp32_channels_last"] if parts.precision.name == "fp32" else
                                         results["bf16_channels_last"] if parts.precision.name == "bf16" else
                                         rate(parts.model, cfg.optimizer, precision=parts.precision, device=device,
                                              batch=n, classes=classes, steps=steps))
    if compile:
        results.update(_compiled(parts, steps))

    synthetic = _Repeat(tuple(x.clone() for x in next(iter(parts.train_loader))), steps)  # FFCV reuses buffers
    for key, loader in (("loop_synthetic", synthetic), ("loop_real_loader", _Limited(parts.train_loader, steps))):
        timed = replace(parts, train_loader=loader)
        training = start_training(timed)
        progress = train_epoch(timed, training, 0)
        results[key] = progress.count / progress.seconds
    results["loop_efficiency"] = results["loop_real_loader"] / results["loop_synthetic"]
    return results


def _compiled(parts, steps: int) -> dict:
    """The run's precision under torch.compile: compile seconds (first steps) apart from images/s."""
    model = copy.deepcopy(parts.model)
    compiled = torch.compile(model)
    step = Step.create(compiled, build_optimizer(model, parts.cfg.optimizer), parts.precision, parts.device)
    images, labels = synthetic_batch(parts.cfg.data.batch_size, len(parts.classes), parts.device,
                                     parts.precision.batch_dtype)
    begin = time.perf_counter()
    step_rate(step, images, labels, steps=1, warmup=1)  # compiles (forward, backward, optimizer)
    compile_s = time.perf_counter() - begin
    return {"compiled": step_rate(step, images, labels, steps, warmup=1), "compile_seconds": compile_s}
