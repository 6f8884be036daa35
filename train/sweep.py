"""Sweeps: one run per config, a results table that fills as runs finish.

A run already complete is skipped and a partial one resumed, so an
interrupted sweep picks up where it stopped; results.md is rewritten
(atomically) after every run.
"""
from __future__ import annotations

import os
from pathlib import Path

from beton.atomic import atomic_write_text
from beton.errors import UserError

from . import distributed
from .config import ExperimentConfig, load_config
from .loop import fit
from .run import RunDir

RESULTS = "results.md"
COLUMNS = ("Model", "Normalization", "Scheduler", "Params", "Training Accuracy", "Test Accuracy",
           "Best epoch", "Time", "Config")


def collect(paths: list[Path]) -> list[Path]:
    """Config files from folders (their *.yaml, sorted) and files, in the order given."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
            if not found:
                raise UserError(f"no *.yaml configs in {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no such config file or folder: {p}")
    return files


VAL_COLUMN = "Val Accuracy"  # after Test Accuracy, when a run of the sweep has a validation split


def _row(summary: dict, config: Path, results_dir: Path, run: RunDir) -> dict:
    cells = [summary["model"], summary["norm"], summary["scheduler"], f"{summary['params']:,}",
             f"{summary['train_acc']:.2f}%", f"{summary['test_acc']:.2f}%",
             f"{summary['best_epoch']} ({summary['best_test_acc']:.2f}%)", f"{summary['seconds']:.0f} s",
             f"[{config.name}]({os.path.relpath(config, results_dir)})"]
    report = run.path / "report.md"
    if report.is_file():
        cells[-1] += f" · [report]({os.path.relpath(report, results_dir)})"
    val = f"{summary['val_acc']:.2f}%" if "val_acc" in summary else "-"
    return dict(zip(COLUMNS, cells), **{VAL_COLUMN: val})


def write_results(rows: list[dict], results: Path) -> None:
    columns = list(COLUMNS)
    if any(r[VAL_COLUMN] != "-" for r in rows):
        columns.insert(columns.index("Test Accuracy") + 1, VAL_COLUMN)
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    lines = ["| " + " | ".join(r[c] for c in columns) + " |\n" for r in rows]
    atomic_write_text(results, "# Results\n\n" + header + "".join(lines))


# (section, key, value) settings that a run resolves when it starts and saves resolved in its config.yaml
RESOLVED_AT_START = (("scheduler", "max_lr", "find"), ("scheduler", "start_lr", "find"), ("train", "precision", "auto"))


def _same_config(saved: dict, cfg: ExperimentConfig) -> bool:
    """Equal configs, where a saved run may hold what `find`, `auto` and `budget` resolved to."""
    wanted = cfg.to_dict()
    for section, key, value in RESOLVED_AT_START:
        if wanted[section][key] == value:
            wanted[section][key] = saved.get(section, {}).get(key)
    if wanted["train"]["budget"] is not None:  # a budget became a number of epochs (at most the config's)
        epochs = saved.get("train", {}).get("epochs")
        if isinstance(epochs, int) and epochs <= wanted["train"]["epochs"]:
            wanted["train"].update(budget=None, epochs=epochs)
    return saved == wanted


def _run_one(cfg: ExperimentConfig, run: RunDir, log, after_run) -> None:
    """Train, resume (a checkpoint exists: an interrupted or crashed run) or skip (complete)."""
    summary = run.summary()
    if run.last.is_file() or summary is not None:
        if not _same_config(run.config(), cfg):
            raise UserError(f"{run.path} holds a run of a different config; pick another --out for this sweep")
        if summary is not None and summary["complete"]:
            log(f"skip {cfg.name}: complete in {run.path}")
            if not (run.path / "report.md").is_file():
                after_run(run.path)
            return
        log(f"resume {cfg.name} in {run.path}")
        fit(cfg, run, resume=True)
    else:
        log(f"train {cfg.name} -> {run.path}")
        fit(cfg, run)
    after_run(run.path)


def sweep(paths: list[Path], overrides: list[str], out: Path, log=print, after_run=lambda path: None) -> Path:
    """Run every config (skipping complete runs), filling out/results.md; returns its path.

    `after_run(run_folder)` follows each run on every rank (the CLI's analysis, which acts on rank 0
    alone, so results.md can link each report).
    """
    files = collect(paths)
    configs = [(f, load_config(f, overrides)) for f in files]  # validate all before training any
    names = [c.name for _, c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"configs share a name ({', '.join(dupes)}); each run needs its own folder")
    results = out / RESULTS
    rows: list[dict] = []
    for file, cfg in configs:
        run = RunDir(out / cfg.name)
        _run_one(cfg, run, log, after_run)
        if distributed.current().main:  # under torchrun, rank 0 alone writes
            rows.append(_row(run.summary(), file.resolve(), out.resolve(), run))
            write_results(rows, results)
    return results
