"""compare.png: runs side by side (`fastcifar compare RUN...`, and a sweep after every run), each run named by
what differs between the saved configs. The run folders are synthetic: config.yaml, metrics.jsonl and
summary.json written here, no training."""
from __future__ import annotations

import json

import yaml

from analysis.compare import COMPARE, compare, run_labels, short_names
from train.config import build_config, load_config
from train.metrics import run_summary

from .test_train import run_cli
from .train_fixtures import tiny

EPOCHS, STEPS = 3, 10  # the learnable betons' 1,000 training images in batches of 100


def variant(betons, name: str, norm: str, scheduler: dict) -> dict:
    raw = tiny(betons)
    raw.update(name=name, scheduler=scheduler)
    raw["model"]["norm"] = norm
    return raw


def step_lr(e: int, scheduler: dict, lr: float) -> float:
    """The LR epoch e (from 0) starts with under `scheduler` (none or step)."""
    if scheduler["name"] == "none":
        return lr
    return lr * scheduler.get("gamma", 0.1) ** (e // scheduler["step_size"])


def write_run(folder, raw: dict, report: bool = True):
    """A complete run folder of `raw`'s config, as training leaves it (its config resolved and saved)."""
    cfg = build_config(raw)
    metrics = [{"epoch": e + 1, "lr": step_lr(e, raw["scheduler"], cfg.optimizer.lr), "train_loss": 2.0 - 0.4 * e,
                "train_acc": 40.0 + 15 * e, "test_loss": 2.1 - 0.4 * e, "test_acc": 35.0 + 15 * e + len(cfg.name),
                "test_correct": 0, "test_count": 200} for e in range(cfg.train.epochs)]
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    timing = [{"epoch": m["epoch"], "seconds": 1.0} for m in metrics]
    (folder / "summary.json").write_text(json.dumps(run_summary(cfg, 1000, metrics, timing)))
    if report:
        (folder / "report.md").write_text("# analysed\n")  # a sweep then skips the run's analysis
    return folder


RUNS = {"bn_none": ("batch", {"name": "none"}), "ln_step": ("layer", {"name": "step", "step_size": 1, "gamma": 0.5})}


def test_runs_are_named_by_the_keys_their_configs_differ_in():
    configs = [build_config(variant("/b", name, norm, sched)).to_dict() for name, (norm, sched) in RUNS.items()]
    labels = run_labels(configs, list(RUNS))
    # four keys differ (scheduler, norm, step_size, gamma): more than MAX_KEYS, so the folder leads; choices first
    assert labels == ["bn_none (scheduler=none, norm=batch, step_size=10, +1 more)",
                      "ln_step (scheduler=step, norm=layer, step_size=1, +1 more)"]
    configs[1]["scheduler"].update(step_size=10, gamma=0.1)
    assert run_labels(configs, list(RUNS)) == ["scheduler=none, norm=batch", "scheduler=step, norm=layer"]
    # the same config twice (another seed's folder, say): the folder tells them apart
    assert run_labels([configs[0], configs[0]], ["a", "b"]) == ["a", "b"]
    twice = [configs[0], configs[0], configs[1]]
    assert run_labels(twice, ["a", "b", "c"]) == ["scheduler=none, norm=batch [a]", "scheduler=none, norm=batch [b]",
                                                   "scheduler=step, norm=layer"]


def test_a_key_is_named_by_its_shortest_suffix_no_other_shares():
    keys = ["model.norm", "scheduler.name", "optimizer.lr", "optimizer.roles.filters.lr", "optimizer.roles.head.name"]
    assert short_names(keys) == {"model.norm": "norm", "scheduler.name": "scheduler", "optimizer.lr": "optimizer.lr",
                                 "optimizer.roles.filters.lr": "filters.lr", "optimizer.roles.head.name": "head"}


def test_compare_overlays_every_run_and_its_lr_of_every_step(learnable_betons, tmp_path):
    from analysis.compare import load_runs, plot_compare

    folders = [write_run(tmp_path / name, variant(learnable_betons, name, norm, {**sched}))
               for name, (norm, sched) in RUNS.items()]
    runs = load_runs(folders)
    assert [r.label for r in runs] == ["bn_none (scheduler=none, norm=batch, step_size=10, +1 more)",
                                       "ln_step (scheduler=step, norm=layer, step_size=1, +1 more)"]
    path, (ax_acc, ax_loss, ax_lr) = plot_compare(runs, tmp_path / COMPARE)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [line.get_label() for line in ax_acc.get_lines()] == [r.label for r in runs]
    assert [list(line.get_xdata()) for line in ax_loss.get_lines()] == [[1, 2, 3]] * 2
    lr_lines = ax_lr.get_lines()
    assert [len(line.get_xdata()) for line in lr_lines] == [EPOCHS * STEPS] * 2  # every step, each run
    assert list(lr_lines[1].get_ydata()[::STEPS]) == [0.05, 0.025, 0.0125]  # step: halved each epoch
    for ax in (ax_acc, ax_loss, ax_lr):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [0, 1, 2, 3]


def test_sweep_draws_its_runs_side_by_side_after_every_run(learnable_betons, tmp_path, capsys):
    from train.sweep import sweep

    configs, out = tmp_path / "configs", tmp_path / "out"
    configs.mkdir()
    for name, (norm, sched) in RUNS.items():
        raw = variant(learnable_betons, name, norm, sched)
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        write_run(out / name, load_config(configs / f"{name}.yaml").to_dict())  # complete: the sweep skips it
    calls = []
    sweep([configs], [], out, log=lambda line: None, after_results=lambda folder, runs: calls.append((folder, runs)))
    assert calls == [(out, [out / "bn_none"]), (out, [out / "bn_none", out / "ln_step"])]

    code, printed = run_cli(["sweep", str(configs), "--out", str(out)], capsys)
    assert code == 0, printed.err
    assert (out / COMPARE).read_bytes()[:4] == b"\x89PNG" and (out / "results.md").is_file()
    (out / COMPARE).unlink()
    code, printed = run_cli(["sweep", str(configs), "--out", str(out), "--no-analyze"], capsys)
    assert code == 0 and not (out / COMPARE).exists()


def test_cli_compare_writes_beside_the_runs_and_errors_are_one_line(learnable_betons, tmp_path, capsys):
    folders = [write_run(tmp_path / "grid" / name, variant(learnable_betons, name, norm, sched))
               for name, (norm, sched) in RUNS.items()]
    code, printed = run_cli(["compare", *map(str, folders)], capsys)
    assert code == 0, printed.err
    assert (tmp_path / "grid" / COMPARE).read_bytes()[:4] == b"\x89PNG"
    assert compare(folders, tmp_path / "elsewhere" / "c.png") == tmp_path / "elsewhere" / "c.png"
    (tmp_path / "grid" / "unfinished").mkdir()
    (tmp_path / "grid" / "unfinished" / "config.yaml").write_text(yaml.safe_dump(build_config(tiny("/b")).to_dict()))
    for args, message in (([tmp_path / "nowhere"], "run folder not found"),
                          ([tmp_path / "grid"], "is not a run folder (no config.yaml)"),
                          ([tmp_path / "grid" / "unfinished"], "has no metrics.jsonl yet"),
                          ([folders[0], "--out", tmp_path / "c.txt"], "give --out a .png path")):
        code, printed = run_cli(["compare", *map(str, args)], capsys)
        assert code == 2 and printed.err.startswith("error: ") and message in printed.err
        assert len(printed.err.strip().splitlines()) == 1
