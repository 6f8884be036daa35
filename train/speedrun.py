"""`fastcifar bench speedrun`: N full runs of one config with different seeds, as the speed records are kept.

Each run trains the config (train.seed and data.seed set to the run's number) into a temporary run folder,
without the analysis, and reports its final test accuracy (with the config's TTA) and its wall time
from the start of `fit` to the end of the last evaluation, set-up included. Shown apart:
- set-up: wall time minus the epochs' training and evaluation (building the model and loaders, the
  whitening init, a precision or budget measurement);
- compile: with train.compile, one untimed warm-up epoch first compiles the model (torch's compile
  caches then serve the timed runs, as airbench's warm-up run does); its wall time is reported;
- TTA: the last epoch's evaluation beyond the mean of the earlier ones (with eval.tta_last_only),
  or its whole evaluation time otherwise.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from .config import ExperimentConfig
from .loop import fit
from .run import RunDir


def _with_seed(cfg: ExperimentConfig, seed: int, **train) -> ExperimentConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=seed),
                               train=dataclasses.replace(cfg.train, seed=seed, **train))


def warmup_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The untimed compile warm-up: `cfg` for one epoch, on a seed no timed run uses. A schedule's
    `peak_epoch` is scaled with the epochs (the peak at the same fraction of the run), as it must stay under
    train.epochs: the one-epoch config is then valid whenever `cfg` is."""
    sched = cfg.scheduler
    if sched.peak_epoch is not None:
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(
            sched, peak_epoch=sched.peak_epoch / cfg.train.epochs))
    return _with_seed(cfg, 10_000, epochs=1, budget=None)


def one_run(cfg: ExperimentConfig, folder: Path) -> dict:
    run = RunDir(folder)
    start = time.perf_counter()
    history = fit(cfg, run)
    wall = time.perf_counter() - start
    timing = _timing(run)
    evals = [t["eval_seconds"] for t in timing]
    earlier = evals[:-1]
    tta = evals[-1] - statistics.mean(earlier) if cfg.eval.tta_last_only and earlier else (
        evals[-1] if cfg.eval.tta != "none" else 0.0)
    return {"accuracy": history[-1]["test_acc"], "seconds": wall,
            "setup_seconds": wall - sum(t["seconds"] for t in timing), "tta_seconds": max(tta, 0.0),
            "epochs": len(history)}


def _timing(run: RunDir) -> list[dict]:
    import json

    return [json.loads(line) for line in (run.path / "timing.jsonl").read_text().splitlines() if line.strip()]


def speedrun(cfg: ExperimentConfig, runs: int, log=print) -> dict:
    results: dict = {"config": cfg.name, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="fastcifar-speedrun-") as tmp:
        if cfg.train.compile:
            start = time.perf_counter()
            fit(warmup_config(cfg), RunDir(Path(tmp) / "warmup"))
            results["compile_seconds"] = time.perf_counter() - start
            log(f"warm-up (compile) run: {results['compile_seconds']:.1f} s")
        done = []
        for i in range(runs):
            r = one_run(_with_seed(cfg, i), Path(tmp) / f"run{i}")
            done.append(r)
            log(f"run {i + 1}/{runs}: {r['accuracy']:.2f}% in {r['seconds']:.1f} s (set-up {r['setup_seconds']:.1f} s, "
                f"TTA {r['tta_seconds']:.1f} s, {r['epochs']} epochs)")
    accuracies = [r["accuracy"] for r in done]
    seconds = [round(r["seconds"], 2) for r in done]
    results.update(accuracies=accuracies, mean_accuracy=statistics.mean(accuracies),
                   std_accuracy=statistics.stdev(accuracies) if runs > 1 else 0.0,
                   seconds=seconds, mean_seconds=statistics.mean(seconds),
                   setup_seconds=[round(r["setup_seconds"], 2) for r in done],
                   tta_seconds=[round(r["tta_seconds"], 2) for r in done])
    return results
