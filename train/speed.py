"""Training speed, measured rather than assumed: images/s of the training step, and `precision: auto`.

On the CPU, bf16 autocast was 2.7x faster than fp32 on one 2-core machine (AMD Zen 4) and slower
on another (Intel Xeon, AVX-512 with bf16 but no AMX), so `auto` times a few steps of the run's own
model and batch in fp32 and in bf16 (channels_last both) and takes the faster. The figures are
cached per machine (CPU model, cores, torch version, model, batch) in `$FASTCIFAR_CACHE` (default
~/.cache/fastcifar), so the measurement is paid once. On CUDA, auto is `hardware.cuda_precision`.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from beton.atomic import atomic_write_text
from fastloader.threads import cpu_cores, own_torch_threads

from .hardware import Precision, cuda_precision, resolve_precision, reusing_freed_memory
from .step import Step, train_step

PROBE_STEPS = 3  # timed steps per precision (after one warm-up step)
CACHE_FILE = "precision.json"


def synthetic_batch(n: int, classes: int, device: torch.device, dtype=torch.float32, seed: int = 0):
    """A random channels_last batch from a private generator (the global RNG, and so the run, is untouched)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    return images.contiguous(memory_format=torch.channels_last), labels


def step_rate(step: Step, images: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int = 1) -> float:
    """Images/s of `train_step` on one batch served `warmup + steps` times (the warm-up ones untimed)."""
    for i in range(warmup + steps):
        if i == warmup:
            if step.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _ = train_step(step, images, labels)
    loss.item()  # waits for the device
    return steps * len(labels) / (time.perf_counter() - start)


def rate(model: torch.nn.Module, optimizer_cfg, precision: Precision, device: torch.device, batch: int,
         classes: int, steps: int, channels_last: bool = True) -> float:
    """Images/s of a copy of `model` (its weights and buffers untouched) with a fresh optimizer."""
    from .optim import build_optimizer

    probe = copy.deepcopy(model).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    step = Step.create(probe, build_optimizer(probe, optimizer_cfg), precision, device)
    images, labels = synthetic_batch(batch, classes, device, precision.batch_dtype)
    if not channels_last:
        images = images.contiguous()
    return step_rate(step, images, labels, steps)


def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(cfg, device: torch.device) -> str:
    """What the measurement depends on; freed-memory reuse changes fp32 and bf16 by different factors."""
    m = cfg.model
    return (f"{cpu_model()}|{cpu_cores()} threads|torch {torch.__version__}|{device.type}|{m.name}|{m.norm}|"
            f"{json.dumps(m.strides)}|{json.dumps(m.options, sort_keys=True)}|batch {cfg.data.batch_size}"
            f"{'|reused memory' if reusing_freed_memory() else ''}")


def _cache_path() -> Path:
    root = os.environ.get("FASTCIFAR_CACHE") or Path.home() / ".cache" / "fastcifar"
    return Path(root) / CACHE_FILE


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, rates: dict) -> None:
    data = _read_cache()
    data[key] = rates
    try:
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_cache_path(), json.dumps(data, indent=1) + "\n")
    except Exception:  # a cache that cannot be written only costs a measurement next time
        pass


def measure_precisions(cfg, model: torch.nn.Module, device: torch.device, classes: int,
                       steps: int = PROBE_STEPS) -> dict[str, float]:
    """Images/s of fp32 and bf16 autocast, channels_last both, for the run's model and batch."""
    return {name: rate(model, cfg.optimizer, resolve_precision(name, device), device, cfg.data.batch_size,
                       classes, steps) for name in ("fp32", "bf16")}


def auto_precision(cfg, model: torch.nn.Module, device: torch.device, classes: int) -> tuple[str, str]:
    """(precision, the line for train.log): what `precision: auto` resolves to for this run."""
    if device.type == "cuda":
        name = cuda_precision(device)
        return name, f"precision auto -> {name} (CUDA{'' if name == 'bf16' else ' without native bf16'})"
    own_torch_threads()  # importing FFCV left torch on one thread: time what training will use
    key = cache_key(cfg, device)
    rates = _read_cache().get(key)
    source = "cached measurement"
    if not (isinstance(rates, dict) and all(isinstance(rates.get(k), (int, float)) for k in ("fp32", "bf16"))):
        rates = measure_precisions(cfg, model, device, classes)
        _write_cache(key, rates)
        source = f"measured over {PROBE_STEPS} steps each"
    name = "bf16" if rates["bf16"] > rates["fp32"] else "fp32"
    return name, (f"precision auto -> {name}: fp32 {rates['fp32']:,.1f} vs bf16 {rates['bf16']:,.1f} images/s "
                  f"({cfg.model.name}, batch {cfg.data.batch_size}, channels_last; {source} on {cpu_model()})")


# ---------------------------------------------------------------- train.budget

BUDGET_WARMUP, BUDGET_STEPS, BUDGET_EVAL_BATCHES = 2, 6, 4


def epoch_seconds(s, steps: int = BUDGET_STEPS, eval_batches: int = BUDGET_EVAL_BATCHES) -> tuple[float, float]:
    """(train, evaluation) seconds of one epoch of Setup `s`, timed over a few real batches.

    Steps train a copy of the model with a fresh optimizer (the run's model, RNG and loader epoch are
    left as they were); the first BUDGET_WARMUP steps are not timed (compilation, caches). Under torchrun
    every rank runs it on its shard (the same number of steps each): with model.sync_bn each training
    forward is a collective, which one rank alone would wait on until train.dist_timeout."""
    from fastloader.loaders import cycle

    from . import checkpoint
    from .optim import build_optimizer

    model = copy.deepcopy(s.model)
    step = Step.create(model, build_optimizer(model, s.cfg.optimizer), s.precision, s.device, s.cfg.train)
    rng, epoch = checkpoint.rng_state(), getattr(s.train_loader, "epoch", None)
    batches = cycle(s.train_loader)
    try:
        model.train()
        for i in range(BUDGET_WARMUP + steps):
            if i == BUDGET_WARMUP:
                _sync(s.device)
                begin = time.perf_counter()
            images, labels = next(batches)
            loss, _ = train_step(step, images, labels)
        loss.item()
        per_step = (time.perf_counter() - begin) / steps
    finally:
        batches.close()
        checkpoint.set_rng_state(rng)
        if epoch is not None:
            s.train_loader.set_epoch(epoch)
    model.eval()
    timed, begin = 0, time.perf_counter()
    with torch.no_grad():
        for images, _ in s.test_loader:  # a whole test epoch would be the cost itself: a few batches
            with s.precision.autocast(s.device):
                model(images).float().sum().item()
            timed += 1
            if timed == 1:  # the first one warms up
                begin = time.perf_counter()
            elif timed == eval_batches + 1:
                break
    per_eval_batch = (time.perf_counter() - begin) / max(timed - 1, 1)
    return per_step * len(s.train_loader), per_eval_batch * len(s.test_loader)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def budget_epochs(budget_s: float, spent_s: float, train_s: float, eval_s: float, max_epochs: int) -> int:
    """Epochs whose training and evaluation fit in what is left of the budget (at least 1, at most max_epochs)."""
    return int(max(1, min(max_epochs, (budget_s - spent_s) // (train_s + eval_s))))


def resolve_budget(s, started: float) -> tuple[object, str | None]:
    """`train.budget` -> a number of epochs: (config with epochs set and budget null, the line for train.log).

    `started`: time.perf_counter() when the run began (what start-up already spent counts)."""
    from dataclasses import replace

    cfg = s.cfg
    budget = cfg.train.budget_seconds()
    if budget is None:
        return cfg, None
    train_s, eval_s = epoch_seconds(s)
    spent = time.perf_counter() - started
    epochs = budget_epochs(budget, spent, train_s, eval_s, cfg.train.epochs)
    line = (f"train.budget {cfg.train.budget}: {epochs} epochs (at most {cfg.train.epochs}); one epoch measured at "
            f"{train_s:.1f} s training + {eval_s:.1f} s evaluation, {spent:.1f} s spent before training")
    return replace(cfg, train=replace(cfg.train, epochs=epochs, budget=None)), line
