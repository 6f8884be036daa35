"""`fastcifar bench train`: training images/s by memory format and precision, and what loading costs.

Every figure times `step.train_step`, the training loop's own step, on the config's model and batch:
- fp32_nchw, fp32_channels_last, bf16_channels_last: one synthetic batch, a fresh copy of the model
  each; `auto` is what `precision: auto` resolves to on this machine (the faster of the last two on
  the CPU, measured here rather than read from the cache); `channels_last_autocast` is the run's
  precision (the config's, `auto` resolved), kept for scripts that read it;
- compiled (with --compile): the run's precision under `torch.compile`, compile time apart;
- the loop (`loop_measures`, also `fastcifar bench loop` over many configs): `loop.train_epoch` itself over
  the real loader, and over one batch already in memory served as many times, alternated `rounds` times;
  the median of the paired ratios of their steady rates is the loop efficiency (1.0: data loading costs
  nothing), the wait for an epoch's first batch timed apart and counted once per epoch of the config. A shared
  machine's speed can swing 2x from one second to the next (`fastcifar bench machine`), which no single
  pair survives; so the loader is also timed alone, in CPU seconds per image (the cores' time it takes
  from training, whatever their speed): `loader_cpu_share` = loader / (loader + training step).
- `steadiness`: how much the machine's own speed swings (a fixed matmul, second after second).
- `turn_about` (`fastcifar bench steps`): several configs' training steps compared, one step of each in turn, so
  that the machine's slow spells hit all of them alike; per image, each config's fastest, median and slowest
  step, and the median over rounds of its step time over the first config's in the same round.
"""
from __future__ import annotations

import copy
import resource
import statistics
import time
from dataclasses import replace
from typing import Iterator

import torch

from .config import ExperimentConfig, SchedulerConfig
from .hardware import resolve_precision, reusing_freed_memory
from .loop import train_epoch
from .optim import build_optimizer
from .parts import build
from .precision import chosen_precision, probe_step, rate, step_rate, steps_in_turn, synthetic_batch
from .state import start_training
from .step import Step


class _Repeat:
    """One in-memory batch served `n` times: a `parts.BatchLoader` without loading."""

    def __init__(self, batch, n: int):
        self.batch, self.n, self.num_samples = batch, n, n * len(batch[1])
        self.first_batch_seconds = 0.0

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
        self.first_batch_seconds = 0.0  # the epoch's start: from iter() to its first batch

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        begin = time.perf_counter()
        for i, batch in enumerate(self.loader):
            if i == 0:
                self.first_batch_seconds = time.perf_counter() - begin
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


def run(cfg: ExperimentConfig, steps: int, compile: bool = False, loop_only: bool = False, rounds: int = 1) -> dict:
    """`bench train`'s figures (keys in the module docstring); `loop_only` skips the precision table."""
    parts = build(loop_config(cfg))
    cfg = parts.cfg
    device, n, classes = parts.device, cfg.data.batch_size, len(parts.classes)
    results = {"model": cfg.model.name, "batch_size": n, "device": str(device), "threads": torch.get_num_threads(),
               "reuse_memory": reusing_freed_memory(), "precision": parts.precision.name}
    if not loop_only:
        results.update(_precisions(parts, steps))
    if compile:
        results.update(_compiled(parts, steps))
    results.update(loop_measures(parts, steps, rounds))
    return results


def _precisions(parts, steps: int) -> dict:
    cfg, device = parts.cfg, parts.device
    n, classes = cfg.data.batch_size, len(parts.classes)
    results = {}
    for key, name, channels_last in (("fp32_nchw", "fp32", False), ("fp32_channels_last", "fp32", True),
                                     ("bf16_channels_last", "bf16", True)):
        results[key] = rate(parts.model, cfg.optimizer, precision=resolve_precision(name, device), device=device,
                            batch=n, classes=classes, steps=steps, channels_last=channels_last)
    results["auto"] = chosen_precision(device, {"fp32": results["fp32_channels_last"],
                                                "bf16": results["bf16_channels_last"]})
    results["channels_last_autocast"] = (results["fp32_channels_last"] if parts.precision.name == "fp32" else
                                         results["bf16_channels_last"] if parts.precision.name == "bf16" else
                                         rate(parts.model, cfg.optimizer, precision=parts.precision, device=device,
                                              batch=n, classes=classes, steps=steps))
    return results


def _cpu_seconds() -> float:
    """This process's CPU time, every thread (the loader's and torch's) counted."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loop_measures(parts, steps: int, rounds: int = 1) -> dict:
    """The training loop over the real loader against one in-memory batch, `rounds` alternating pairs of
    `steps` batches each (medians), and the loader alone in CPU seconds per image (the module docstring).

    A real epoch starts by waiting for its first batch (FFCV starts its thread and fills its buffers): paid once
    an epoch, it is timed apart (`epoch_start_seconds`), the rates are the steady ones after it, and
    `loop_efficiency_epoch` is what both together leave of the in-memory rate over one of the config's epochs."""
    synthetic = _Repeat(tuple(x.clone() for x in next(iter(parts.train_loader))), steps)  # FFCV reuses buffers
    rates: dict[str, list[float]] = {"loop_synthetic": [], "loop_real_loader": []}
    cpu_per_image: dict[str, list[float]] = {"loop_synthetic": [], "loop_real_loader": []}
    starts = []
    for _ in range(rounds):
        for key, loader in (("loop_synthetic", synthetic), ("loop_real_loader", _Limited(parts.train_loader, steps))):
            timed = replace(parts, train_loader=loader)
            training = start_training(timed)
            cpu = _cpu_seconds()
            progress = train_epoch(timed, training, 0)  # the one epoch of loop_config, each round
            start = loader.first_batch_seconds
            rates[key].append(progress.count / max(progress.seconds - start, 1e-9))
            cpu_per_image[key].append((_cpu_seconds() - cpu) / progress.count)
            if key == "loop_real_loader":
                starts.append(start)
    ratios = [real / memory for memory, real in zip(rates["loop_synthetic"], rates["loop_real_loader"])]
    loader_cpu = loader_cpu_per_image(parts.train_loader, steps)
    step = statistics.median(cpu_per_image["loop_synthetic"])
    # what the loop over the real loader spent beyond the in-memory one, paired: the loader's own work plus any
    # the training threads lost to it (waiting, spinning) shows here, in CPU time, whatever the cores' speed
    extra = statistics.median(real - memory for memory, real in zip(cpu_per_image["loop_synthetic"],
                                                                    cpu_per_image["loop_real_loader"]))
    images = len(parts.train_loader) * parts.cfg.data.batch_size  # one epoch of the config
    over_epoch = [(images / memory) / (images / real + start) for memory, real, start in
                  zip(rates["loop_synthetic"], rates["loop_real_loader"], starts)]  # paired, as `ratios`
    return {"loop_synthetic": statistics.median(rates["loop_synthetic"]),
            "loop_real_loader": statistics.median(rates["loop_real_loader"]),
            "loop_efficiency": statistics.median(ratios), "loop_efficiency_range": [min(ratios), max(ratios)],
            "epoch_start_seconds": statistics.median(starts),
            "loop_efficiency_epoch": statistics.median(over_epoch),
            "rounds": rounds, "loader_cpu_ms_per_image": 1000 * loader_cpu,
            "step_cpu_ms_per_image": 1000 * step, "loader_cpu_share": loader_cpu / (loader_cpu + step),
            "real_loop_extra_cpu_ms_per_image": 1000 * extra}


def loader_cpu_per_image(loader, batches: int) -> float:
    """CPU seconds per image of the loader alone (its threads, the batch's finish on this one), over the first
    `batches` of an epoch after one untimed batch (the epoch's start, paid once)."""
    loader.set_epoch(0)
    count, begin = 0, None
    for index, (images, labels) in enumerate(loader):
        if index == 0:
            begin = _cpu_seconds()
            continue
        count += len(labels)
        if index == batches:
            break
    if count == 0:  # a one-batch epoch: time that batch
        loader.set_epoch(0)
        begin = _cpu_seconds()
        count = sum(len(labels) for _, labels in loader)
    return (_cpu_seconds() - begin) / count


def steadiness(seconds: float, window: float = 0.5) -> dict:
    """The machine's own speed, window after window: GFLOP/s of a 1024 x 1024 matmul in fp32 and bf16 (what
    the CPU's units do with no loader, no model and no Python in the way). On a quiet dedicated machine
    every window reads alike; max/min says how far timings of anything else may swing here."""
    size = 1024
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up (oneDNN/BLAS kernel selection)
        found[str(dtype).removeprefix("torch.")] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for name in found:
            dtype = getattr(torch, name)
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            count, begin = 0, time.perf_counter()
            while time.perf_counter() - begin < window:
                a @ b
                count += 1
            found[name].append(count * 2 * size ** 3 / (time.perf_counter() - begin) / 1e9)
    return {name: {"gflops": [round(x, 1) for x in values], "min": min(values), "median": statistics.median(values),
                   "max": max(values), "max_over_min": max(values) / min(values)} for name, values in found.items()}


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


def turn_about(configs: list[ExperimentConfig], rounds: int, warmup: int = 2) -> list[dict]:
    """Each config's training step (its model, batch, optimizer and precision, `auto` resolved; a synthetic
    batch, a copy of the model) timed one step at a time in turn, `rounds` times after `warmup` untimed steps
    each: ms per image (fastest, median, slowest) and `vs_first`, the median over rounds of its step's
    ms per image over the first config's in the same round (1.0 for the first)."""
    probes = []
    for cfg in configs:
        parts = build(cfg)
        step, images, labels = probe_step(parts.model, cfg.optimizer, parts.precision, parts.device,
                                          cfg.data.batch_size, len(parts.classes))
        if cfg.train.compile:
            step.model = torch.compile(step.model)
        probes.append((parts, step, images, labels))
    seconds = steps_in_turn([probe[1:] for probe in probes], rounds, warmup)
    ms = [[1000 * s / len(labels) for s in times] for times, (_, _, _, labels) in zip(seconds, probes)]
    return [{"model": parts.cfg.model.name, "batch_size": parts.cfg.data.batch_size,
             "precision": parts.precision.name, "ms_per_image": times,
             "fastest_ms": min(times), "median_ms": statistics.median(times), "slowest_ms": max(times),
             "images_per_s": 1000 / statistics.median(times),
             "vs_first": statistics.median(mine / first for mine, first in zip(times, ms[0]))}
            for (parts, *_), times in zip(probes, ms)]
