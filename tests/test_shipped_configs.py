"""Every shipped config through every command that takes a config: `train` (with its analysis), `bench train
--config`, `lr-find` and `bench speedrun`, each as a user runs it, on a tiny subset in batches of one.

The configs are found by glob when the tests are collected, so a config added to configs/ is covered without
anyone listing it. `train` runs every config; the three commands that derive a config of their own from it (bench
train's constant LR, the range test, the speedrun's seeds and warm-up) run once per distinct set of the sections
they derive from, everything but `model` (the seed grid's twelve configs are three such sets, its schedulers): a
config that differs from every other in more than its model runs all four. The overrides only size the run (data, epochs, steps,
a OneCycle peak at the same fraction of the shorter run, the range test's steps); the model, optimizer, scheduler,
precision, budget, TTA and every other section are the config's own, since those are what a command derives
its own configs from (bench train's constant LR, the speedrun's seeds and warm-up, `max_lr: find`, the budget).
Batches of one image: the edge batch (labels of N = 1) in every command and every model.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

from fastcifar_cli import main
from train.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("seeds/*.yaml"))
ONECYCLE_STEPS = 4  # the fewest optimizer steps a OneCycle schedule accepts (train.optim)
RANGE_TEST_STEPS = 8  # `max_lr: find` in train and bench speedrun: the range test's batches (100 as shipped)


def _ids(path: Path) -> str:
    return str(path.relative_to(CONFIGS).with_suffix(""))


@pytest.fixture(scope="module")
def loaders_built_once():
    """`build_loader` remembered per (data section, split, device, dtype) while this module runs.

    Building an FFCV loader compiles its pipeline on first use (seconds on 2 cores); the commands here build
    the same few loaders again and again (the twelve seed configs share one data section). Each distinct
    loader is still built by the real function, and each iteration is a fresh epoch."""
    import analysis.predictions
    import train.parts
    from fastloader import loaders
    from fastloader.config import to_dict

    real, built = loaders.build_loader, {}

    def build_loader(cfg, split, device="cpu", dtype=torch.float32, manifest=None, shard=True):
        key = (json.dumps(to_dict(cfg), sort_keys=True), split, str(torch.device(device)), dtype, shard)
        if key not in built:
            built[key] = real(cfg, split, device, dtype, manifest, shard)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        for module in (loaders, train.parts, analysis.predictions):
            patch.setattr(module, "build_loader", build_loader)
        yield built


@pytest.fixture(scope="module")
def short_range_test():
    """`max_lr: find` resolved by a range test of RANGE_TEST_STEPS batches over the same LR range, not 100:
    `train` and `bench speedrun` still run the range test and train with the LRs it finds."""
    import train.loop
    from train.lr_find import resolve_max_lr

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.loop, "resolve_max_lr", functools.partial(resolve_max_lr, iters=RANGE_TEST_STEPS))
        yield


def sized(path: Path, betons: Path) -> list[str]:
    """--set overrides that size `path`'s config for a test: one epoch of the 4 steps OneCycle needs at least, in
    batches of one; a OneCycle `peak_epoch` at the same fraction of that epoch as of the config's run (as the
    speedrun's warm-up scales it: it must stay under the epochs)."""
    cfg = load_config(path)
    sets = [f"data.beton_dir={betons}", "data.batch_size=1", "data.test_batch_size=1", "data.test_subset=2",
            "data.workers=1", f"data.subset={ONECYCLE_STEPS}", "train.epochs=1"]
    if cfg.scheduler.name == "onecycle" and cfg.scheduler.peak_epoch is not None:
        sets.append(f"scheduler.peak_epoch={cfg.scheduler.peak_epoch / cfg.train.epochs!r}")
    if cfg.data.val_split:
        sets.append("data.val_split=1")
    return [arg for assignment in sets for arg in ("--set", assignment)]


def _run(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    assert exc.value.code == 0, f"fastcifar {' '.join(args[:3])}: {out.err.strip().splitlines()[-1:]}"
    return out.out


def _json(args: list[str], capsys) -> dict:
    return json.loads(_run(args, capsys).strip().splitlines()[-1])


ANALYSED: set = set()  # (model, eval) sections whose run the analysis has read in this session
DERIVED: set = set()  # the non-model sections whose derived configs bench train, lr-find and speedrun have run


def _derived_key(path: Path) -> str:
    """What bench train, lr-find and bench speedrun derive their configs from: every section but the model."""
    sections = load_config(path).to_dict()
    sections.pop("model")
    sections.pop("name", None)
    return json.dumps(sections, sort_keys=True)


def _analysis_key(path: Path) -> str:
    """What the analysis of a run depends on beyond its data: the model (Grad-CAM's layer) and the evaluation."""
    cfg = load_config(path)
    return json.dumps([cfg.to_dict()["model"], cfg.to_dict()["eval"]], sort_keys=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=_ids)
def test_every_command_runs_the_shipped_config(path, learnable_betons, loaders_built_once, short_range_test, tmp_path,
                                               capsys):
    """train ends with the analysis once per distinct model and evaluation (the twelve seed configs have four
    models); the others pass --no-analyze. The other three commands once per distinct non-model sections."""
    sets = sized(path, learnable_betons)
    run, key = tmp_path / "run", _analysis_key(path)
    analyse = key not in ANALYSED
    _run(["train", str(path), *sets, "--out", str(run), *([] if analyse else ["--no-analyze"])], capsys)
    assert json.loads((run / "summary.json").read_text())["complete"]
    assert (run / "report.md").is_file() == analyse
    ANALYSED.add(key)
    if _derived_key(path) in DERIVED:
        return  # another config with the same non-model sections ran the three commands below
    DERIVED.add(_derived_key(path))

    bench = _json(["bench", "train", "--config", str(path), "--batch-size", "1", "--steps", "1", "--rounds", "1",
                   "--json", *sets], capsys)
    assert bench["loop_real_loader"] > 0 and bench["loop_synthetic"] > 0

    _run(["lr-find", str(path), "--iters", "2", *sets, "--out", str(tmp_path / "lr")], capsys)
    assert json.loads((tmp_path / "lr" / "lr_find.json").read_text())["steps"] >= 1

    timed = _json(["bench", "speedrun", str(path), "--runs", "1", "--json", *sets], capsys)
    assert len(timed["accuracies"]) == 1 and timed["seconds"][0] > 0


def test_the_configs_are_found_where_users_add_them():
    assert {p.parent.name for p in SHIPPED} == {"configs", "seeds"} and len(SHIPPED) >= 19


@pytest.mark.parametrize("path", SHIPPED, ids=_ids)
def test_the_speedrun_warmup_of_every_shipped_config_builds_its_schedule(path):
    """`bench speedrun` with train.compile first trains one untimed epoch: its config must be valid for every
    config, a OneCycle `peak_epoch` included (it must stay under the warm-up's one epoch)."""
    from train.models import create_model
    from train.optim import build_optimizer, build_schedule
    from train.speedrun import warmup_config

    cfg = warmup_config(load_config(path, ["train.compile=true"]))
    assert cfg.train.epochs == 1 and cfg.train.budget is None
    found = {key: lr for key, lr in (("max_lr", 0.01), ("start_lr", 0.001)) if getattr(cfg.scheduler, key) == "find"}
    sched = dataclasses.replace(cfg.scheduler, **found)  # what resolve_max_lr's range test does at run time
    optimizer = build_optimizer(create_model(cfg.model, num_classes=10), cfg.optimizer)
    build_schedule(optimizer, sched, cfg.train.epochs, 98, cfg.optimizer.lr)  # CIFAR-10 in batches of 512
