"""`fastcifar bench train`: training images/s, and how much of it the data loading costs.

- fp32_nchw vs channels_last_autocast: the same model and synthetic batch,
  plain fp32 in NCHW against channels_last under autocast (bf16 on the CPU).
- loop_real_loader vs loop_synthetic: `loop.train_epoch` itself over the real
  loader, and over one batch already in memory served as many times; their
  ratio is the loop efficiency (1.0: data loading costs nothing).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from .config import ExperimentConfig
from .hardware import resolve_precision
from .loop import build, train_epoch
from .models import create_model
from .optim import build_optimizer, build_schedule

WARMUP = 1


def _step_rate(model, images, labels, precision, device, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(WARMUP + steps):
        if i == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with precision.autocast(device):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()
    return steps * len(labels) / (time.perf_counter() - start)


class _Repeat:
    """One in-memory batch served `n` times, with the loader interface train_epoch uses."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch


def run(cfg: ExperimentConfig, steps: int) -> dict:
    s = build(cfg)
    device, n = s.device, cfg.data.batch_size
    classes = len(s.classes)
    images = torch.randn(n, 3, 32, 32, device=device)
    labels = torch.randint(0, classes, (n,), device=device)
    results = {"model": cfg.model.name, "batch_size": n, "device": str(device), "threads": torch.get_num_threads()}

    torch.manual_seed(0)
    fp32 = resolve_precision("fp32", device)
    plain = create_model(cfg.model, num_classes=classes).to(device)
    results["fp32_nchw"] = _step_rate(plain, images, labels, fp32, device, steps)
    del plain
    fast = s.model
    results["channels_last_autocast"] = _step_rate(
        fast, images.contiguous(memory_format=torch.channels_last).to(s.precision.batch_dtype), labels,
        s.precision, device, steps)
    results["precision"] = s.precision.name

    optimizer = build_optimizer(fast, cfg.optimizer)
    schedule = build_schedule(optimizer, replace(cfg.scheduler, name="none"), 1, steps, cfg.optimizer.lr)
    real = _Limited(s.train_loader, steps)
    synthetic = _Repeat(tuple(t.clone() for t in next(iter(s.train_loader))), steps)  # FFCV reuses buffers
    for key, loader in (("loop_synthetic", synthetic), ("loop_real_loader", real)):
        timed = replace(s, train_loader=loader)
        p = train_epoch(timed, fast, optimizer, schedule, None if s.precision.name != "fp16" else s.precision.scaler(device),
                        0, key)
        results[key] = p.count / p.seconds
    results["loop_efficiency"] = results["loop_real_loader"] / results["loop_synthetic"]
    return results


class _Limited:
    """The first `n` batches of a loader's epoch (the real data path, bounded for a benchmark)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                break
            yield batch
