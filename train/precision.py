"""`precision: auto`, measured rather than assumed, and the images/s of the training step it measures.

On the CPU, bf16 autocast was 2.7x faster than fp32 on one 2-core machine (AMD Zen 4) and slower
on another (Intel Xeon, AVX-512 with bf16 but no AMX), so `auto` times a few steps of the run's own
model and batch (at most PROBE_BATCH) in fp32 and in bf16 (channels_last both) and takes the faster. The figures are
cached per machine (CPU model, cores, torch version, model, batch) in `$FASTCIFAR_CACHE` (default
~/.cache/fastcifar), so the measurement is paid once. On CUDA, auto is `hardware.cuda_precision`.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch

from beton.atomic import atomic_write_text
from fastloader.threads import cpu_cores, own_torch_threads

from .hardware import Precision, cpu_model, cuda_precision, resolve_precision, reusing_freed_memory
from .step import Step, train_step

PROBE_STEPS = 3  # timed steps per precision, turn about (after one warm-up step each)
# the probe's batch, at most: which precision is faster shows at 256 as at the run's batch, and a large batch in fp32
# is what makes a first run's start-up long (speed94 at batch 2000 on a 2-core Xeon with AMX: 36.7 s of probe, the
# bf16/fp32 ratio 2.3x; at 256: 9 s, 3.0x)
PROBE_BATCH = 256
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


def probe_step(model: torch.nn.Module, optimizer_cfg, precision: Precision, device: torch.device, batch: int,
               classes: int, channels_last: bool = True) -> tuple[Step, torch.Tensor, torch.Tensor]:
    """A step on a copy of `model` (its weights and buffers untouched) with a fresh optimizer, and a synthetic
    batch for it."""
    from .optim import build_optimizer

    probe = copy.deepcopy(model).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    step = Step.create(probe, build_optimizer(probe, optimizer_cfg), precision, device)
    images, labels = synthetic_batch(batch, classes, device, precision.batch_dtype)
    if not channels_last:
        images = images.contiguous()
    return step, images, labels


def rate(model: torch.nn.Module, optimizer_cfg, precision: Precision, device: torch.device, batch: int,
         classes: int, steps: int, channels_last: bool = True) -> float:
    """Images/s of a copy of `model` (its weights and buffers untouched) with a fresh optimizer."""
    step, images, labels = probe_step(model, optimizer_cfg, precision, device, batch, classes, channels_last)
    return step_rate(step, images, labels, steps)


def cache_key(cfg, device: torch.device) -> str:
    """What the measurement depends on; freed-memory reuse changes fp32 and bf16 by different factors."""
    m = cfg.model
    return (f"{cpu_model()}|{cpu_cores()} threads|torch {torch.__version__}|{device.type}|{m.name}|{m.norm}|"
            f"{json.dumps(m.strides)}|{json.dumps(m.options, sort_keys=True)}|batch {probe_batch(cfg)}"
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
    """Images/s of fp32 and bf16 autocast, channels_last both, for the run's model at its batch (at most
    PROBE_BATCH). The two are timed turn about, one step at a time, and each is rated by its fastest step: a
    2-core Xeon's AMX units were seen to run at a third of their speed for seconds at a time (docs/benchmarks.md,
    `fastcifar bench machine`), and timed one after the other, a slow spell inside one precision's steps would
    decide the choice; turn about, it slows both."""
    probes = {name: probe_step(model, cfg.optimizer, resolve_precision(name, device), device, probe_batch(cfg),
                               classes) for name in ("fp32", "bf16")}
    seconds = steps_in_turn(list(probes.values()), rounds=steps, warmup=1)
    return {name: probe_batch(cfg) / min(times) for name, times in zip(probes, seconds)}


def steps_in_turn(probes: list[tuple[Step, torch.Tensor, torch.Tensor]], rounds: int,
                  warmup: int) -> list[list[float]]:
    """Seconds of each (step, images, labels)'s `train_step`, timed one step at a time, the probes in turn,
    `rounds` times after `warmup` untimed steps each (first-call allocations, oneDNN's kernels): a slow spell of
    the machine then hits every probe alike. `auto`'s precision probe and `fastcifar bench steps` both time so."""
    for step, images, labels in probes:
        for _ in range(warmup):
            train_step(step, images, labels)[0].item()
    seconds: list[list[float]] = [[] for _ in probes]
    for _ in range(rounds):
        for times, (step, images, labels) in zip(seconds, probes):
            if step.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(step, images, labels)[0].item()  # .item() waits for the device
            times.append(time.perf_counter() - start)
    return seconds


def probe_batch(cfg) -> int:
    return min(cfg.data.batch_size, PROBE_BATCH)


def chosen_precision(device: torch.device, rates: dict[str, float] | None = None) -> str:
    """What `precision: auto` is: on CUDA `hardware.cuda_precision`; on the CPU the faster of fp32 and bf16 by
    `rates` (images/s, channels_last both: `measure_precisions`). `bench train` reports the same choice."""
    if device.type == "cuda":
        return cuda_precision(device)
    return "bf16" if rates["bf16"] > rates["fp32"] else "fp32"


def auto_precision(cfg, model: torch.nn.Module, device: torch.device, classes: int) -> tuple[str, str]:
    """(precision, the line for train.log): what `precision: auto` resolves to for this run."""
    if device.type == "cuda":
        name = chosen_precision(device)
        return name, f"precision auto -> {name} (CUDA{'' if name == 'bf16' else ' without native bf16'})"
    own_torch_threads()  # importing FFCV left torch on one thread: time what training will use
    key = cache_key(cfg, device)
    rates = _read_cache().get(key)
    source = "cached measurement"
    if not (isinstance(rates, dict) and all(isinstance(rates.get(k), (int, float)) for k in ("fp32", "bf16"))):
        rates = measure_precisions(cfg, model, device, classes)
        _write_cache(key, rates)
        source = f"fastest of {PROBE_STEPS} steps each, turn about"
    name = chosen_precision(device, rates)
    return name, (f"precision auto -> {name}: fp32 {rates['fp32']:,.1f} vs bf16 {rates['bf16']:,.1f} images/s "
                  f"({cfg.model.name}, batch {probe_batch(cfg)}, channels_last; {source} on {cpu_model()})")
