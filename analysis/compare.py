"""compare.png: runs side by side. Test accuracy and test loss per epoch of every run overlaid, and the LR
of every step beside them (the first parameter group's, replayed as in curves.png), one colour per run.

A run is named by what differs between the configs compared (their saved config.yaml files, flattened to
dotted keys; `name` and `description` aside): "scheduler=step, norm=layer". The choices (`model.name`,
`scheduler.name`, ...) come first, then the other keys in the config's order; a key is shown by its shortest
suffix that no other differing key shares, with `.name` dropped (`scheduler.name` -> `scheduler`). A run
whose config differs in more than MAX_KEYS keys is named by its folder and the first MAX_KEYS of them.

`fastcifar compare RUN...` draws any run folders; a sweep draws its finished runs next to results.md after
every run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from beton.errors import UserError
from train.config import ExperimentConfig, build_config
from train.run import CONFIG, METRICS, RunDir

from . import curves, plots, schedule

COMPARE = "compare.png"
IGNORED = ("name", "description")  # differ between any two runs of a sweep, and say nothing about them
MAX_KEYS = 3
MISSING = "-"


@dataclass
class ComparedRun:
    path: Path
    raw: dict  # config.yaml as saved (resolved values)
    cfg: ExperimentConfig
    metrics: list[dict]
    label: str = ""


def flatten(raw: dict, prefix: str = "") -> dict[str, object]:
    """Nested mappings to dotted keys (lists stay values; an empty mapping adds none), in the config's order."""
    flat: dict[str, object] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def differing_keys(configs: list[dict]) -> list[str]:
    """Dotted keys whose values are not the same in every config (a key some lack counts), in config order."""
    flats = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    return [k for k in keys if k not in IGNORED and len({_text(f.get(k, MISSING)) for f in flats}) > 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key in `keys` ends with (`.name` dropped first)."""
    bare = {k: k[: -len(".name")] if k.endswith(".name") else k for k in keys}
    names = {}
    for key, parts in ((k, b.split(".")) for k, b in bare.items()):
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (b == suffix or b.endswith("." + suffix)) for other, b in bare.items()):
                break
        names[key] = suffix
    return names


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def run_labels(configs: list[dict], folders: list[str]) -> list[str]:
    """One name per run: its values of the keys that differ, or its folder where none do (or too many)."""
    keys = differing_keys(configs)
    keys = [k for k in keys if k.endswith(".name")] + [k for k in keys if not k.endswith(".name")]  # the choices first
    short = short_names(keys)
    labels = []
    for raw, folder in zip(configs, folders):
        flat = flatten(raw)
        pairs = [f"{short[k]}={_text(flat.get(k, MISSING))}" for k in keys]
        if not pairs:
            labels.append(folder)
        elif len(pairs) > MAX_KEYS:
            labels.append(f"{folder} ({', '.join(pairs[:MAX_KEYS])}, +{len(pairs) - MAX_KEYS} more)")
        else:
            labels.append(", ".join(pairs))
    repeated = {label for label in labels if labels.count(label) > 1}  # e.g. the same config run twice
    return [f"{label} [{folder}]" if label in repeated else label for label, folder in zip(labels, folders)]


def load_runs(paths: list[Path]) -> list[ComparedRun]:
    """The runs' saved configs and metrics, named by what differs between them."""
    runs = []
    for path in paths:
        run = RunDir(path)
        if not run.path.is_dir():
            raise UserError(f"run folder not found: {run.path}")
        raw = run.config()
        metrics = run.metrics()
        if not metrics:
            raise UserError(f"{run.path} has no {METRICS} yet (no epoch finished): nothing to compare")
        runs.append(ComparedRun(run.path, raw, build_config(raw, where=str(run.path / CONFIG)), metrics))
    for run, label in zip(runs, run_labels([r.raw for r in runs], [r.path.name for r in runs])):
        run.label = label
    return runs


def plot_compare(runs: list[ComparedRun], path: str | Path, title: str = ""):
    """Three panels sharing the epoch axis: test accuracy, test loss (per epoch), LR (per step); one legend
    below them. Returns the saved path and the axes (accuracy, loss, LR)."""
    plt = plots.plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax_acc, ax_loss, ax_lr = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, run in enumerate(runs):
        colour = colours[k % len(colours)]
        epochs = [m["epoch"] for m in run.metrics]
        style = dict(color=colour, marker="o", markersize=3 if len(epochs) > 30 else 4, label=run.label)
        ax_acc.plot(epochs, [m["test_acc"] for m in run.metrics], **style)
        ax_loss.plot(epochs, [m["test_loss"] for m in run.metrics], **style)
        count = schedule.train_count(run.cfg)
        trace = schedule.replay_lr(run.cfg, run.metrics, count and schedule.steps_per_epoch(run.cfg, count))
        if trace is not None:
            ax_lr.plot(trace.x, trace.first, color=colour, linewidth=1.5)
        else:  # betons not at hand: the recorded LRs the epochs started with
            ax_lr.plot([e - 1 for e in epochs], [m["lr"] for m in run.metrics], "o", color=colour, markersize=4)
    curves.log_scale_where_wide(ax_lr)
    last = max(m["epoch"] for run in runs for m in run.metrics)
    for ax, name in zip(axes, ("test accuracy (%)", "test loss", "learning rate (first parameter group)")):
        ax.set_title(name, fontsize=12)
        ax.set_xlabel("epoch", fontsize=10)
        ax.grid(alpha=0.3)
        curves.epoch_axis(ax, last)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=1 if len(runs) > 6 else 2,
               fontsize=10, frameon=False)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return plots.save(fig, path), axes


def default_output(paths: list[Path]) -> Path:
    """compare.png in the folder holding the runs (their common parent)."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths])) / COMPARE


def compare(paths: list[Path], out: Path | None = None, title: str = "") -> Path:
    """Draw the runs in `paths` side by side into `out` (default: compare.png beside them), under `title` and
    the number of runs; returns its path."""
    if not paths:
        raise UserError("give at least one run folder to compare")
    out = Path(out) if out is not None else default_output(paths)
    if out.suffix.lower() != ".png":
        raise UserError(f"the comparison is a PNG: give --out a .png path, got {out}")
    runs = load_runs([Path(p) for p in paths])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from e
    count = f"{len(runs)} run{'s' if len(runs) != 1 else ''} side by side"
    path, _ = plot_compare(runs, out, f"{title}: {count}" if title else count)
    return path
