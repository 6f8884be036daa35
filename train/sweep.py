"""Sweeps: one run per config, a results table that fills as runs finish.

A run already complete is skipped and a partial one resumed, so an
interrupted sweep picks up where it stopped; results.md is rewritten
(atomically) after every run. A stop request (Ctrl-C, SIGTERM) ends the
sweep at the next boundary: inside a run (see train.loop), during its
analysis (at once: the analysis is redone by the next sweep), or between
runs (docs/guarantees.md, "Stopping and continuing").
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from beton.atomic import atomic_write_text
from beton.errors import Interrupted, UserError

from . import distributed, hardware, stop
from .config import RUN_SETTINGS, ExperimentConfig, build_config, load_config, with_run_settings
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
    """Equal configs, where a saved run may hold what `find`, `auto` and `budget` resolved to. The saved one is
    read as a config first, so a key added since it was written (its default) does not make it another."""
    return not config_differences(saved, cfg)


def config_differences(saved: dict, cfg: ExperimentConfig) -> list[str]:
    """What differs between a saved run's config and `cfg`, as `section.key: saved -> wanted` (what `find`,
    `auto`, `budget` resolved to and the run settings do not count); empty when they are the same config."""
    try:
        saved = build_config(saved).to_dict()
    except UserError as e:
        return [f"its config.yaml is not a valid config ({e})"]
    wanted = cfg.to_dict()
    for section, key in RUN_SETTINGS:  # how it runs may change between the pieces of a run
        wanted[section][key] = saved.get(section, {}).get(key)
    for section, key, value in RESOLVED_AT_START:
        if wanted[section][key] == value:
            wanted[section][key] = saved.get(section, {}).get(key)
    if wanted["train"]["budget"] is not None:  # a budget became a number of epochs (at most the config's) and its plan
        epochs, plan = saved.get("train", {}).get("epochs"), saved.get("train", {}).get("budget_plan")
        if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs <= wanted["train"]["epochs"]:
            wanted["train"].update(budget=None, epochs=epochs, budget_plan=plan)
    return [f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
            for section, keys in wanted.items() if isinstance(keys, dict) for key, value in keys.items()
            if saved.get(section, {}).get(key) != value] + [
        f"{section}: {saved.get(section)!r} -> {value!r}" for section, value in wanted.items()
        if not isinstance(value, dict) and saved.get(section) != value]


def _run_one(cfg: ExperimentConfig, run: RunDir, log) -> bool:
    """Train, resume (a checkpoint exists: an interrupted or crashed run) or skip (complete); whether its
    analysis is due (a skipped run's is when an earlier sweep stopped before its report.md)."""
    summary = run.summary()
    if run.last.is_file() or summary is not None:
        differences = config_differences(run.config(), cfg)
        if differences:
            raise UserError(f"{run.path} holds a run of a different config ({'; '.join(differences[:3])}"
                            f"{'; ...' if len(differences) > 3 else ''}); pick another --out for this sweep, or "
                            f"remove {run.path} to train it again")
        if summary is not None and summary["complete"]:
            log(f"skip {cfg.name}: complete in {run.path}")
            return not (run.path / "report.md").is_file()
        log(f"resume {cfg.name} in {run.path}")
        # with its saved config, as `train --resume`: what `find`, `auto` and `budget` resolved to at its start;
        # how it runs (RUN_SETTINGS: checkpoint_every, workers, ...) is this sweep's
        fit(with_run_settings(build_config(run.config(), where=f"{run.path}/config.yaml"), cfg), run, resume=True)
    else:
        log(f"train {cfg.name} -> {run.path}")
        fit(cfg, run)
    return True


def sweep(paths: list[Path], overrides: list[str], out: Path, log=print, after_run=lambda path: None,
          after_results=lambda out, runs: None) -> Path:
    """Run every config (skipping complete runs), filling out/results.md; returns its path.

    `after_run(run_folder)` follows each run on every rank (the CLI's analysis, which acts on rank 0
    alone, so results.md can link each report); `after_results(out, run_folders)` follows each rewrite of
    results.md, on rank 0, with the runs listed so far (the CLI's side-by-side figure).
    """
    files = collect(paths)
    configs = [(f, load_config(f, overrides)) for f in files]  # validate all before training any
    names = [c.name for _, c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"configs share a name ({', '.join(dupes)}); each run needs its own folder")
    results = out / RESULTS
    rows: list[dict] = []
    began, finished = time.perf_counter(), []
    with stop.handling(quiet=not distributed.launched().main) as request, request.deferred():
        for done, (file, cfg) in enumerate(configs, 1):
            run = RunDir(out / cfg.name)
            stopped = None
            if _run_one(cfg, run, log):  # raises Interrupted when stopped inside the run
                try:
                    after_run(run.path)
                except Interrupted as e:  # the analysis was stopped (on rank 0): the run itself is complete
                    stopped = e
            if distributed.current().main:  # under torchrun, rank 0 alone writes
                finished.append(run.summary())
                rows.append(_row(finished[-1], file.resolve(), out.resolve(), run))
                write_results(rows, results)
                try:  # ends at once on a stop request, as the analysis does: the next sweep draws it again
                    request.abandonable(after_results, out, [out / c.name for _, c in configs[:done]],
                                        where=f"{done} of {len(configs)} runs complete, listed in {results}; "
                                              f"the figure comparing them is not drawn")
                except Interrupted as e:
                    stopped = stopped or e
            if request.agreed() and (stopped or done < len(configs)):  # every rank, after every run
                raise stopped or Interrupted(f"{done} of {len(configs)} runs complete (the last in {run.path}), "
                                             f"listed in {results}")
    if distributed.current().main:
        log(f"results: {results}")
        log(results.read_text())
        log(done_line(finished, time.perf_counter() - began))
    return results


def done_line(summaries: list[dict], seconds: float) -> str:
    """A sweep's last line: each run's final test accuracy, the sweep's wall time and the machine (`make run`'s
    answer, in one line)."""
    accuracies = ", ".join(f"{s['name']} {s['test_acc']:.2f}%" for s in summaries)
    minutes, rest = divmod(round(seconds), 60)
    return (f"sweep done: {accuracies} final test accuracy; {minutes} min {rest} s (this command: training, evaluation "
            f"and analysis) on {hardware.machine()}")
