"""Training: a tiny run learns, resume is exact, sweeps fill a table, bad input is one line."""
from __future__ import annotations

import json

import pytest
import torch

from fastcifar_cli import main
from train import hardware
from train.config import build_config
from train.loop import Diverged, fit
from train.run import RunDir
from train.sweep import sweep

from .train_fixtures import tiny  # also imported from here by the other training tests


def test_tiny_run_learns_and_fills_its_run_folder(tiny_run):
    run, history = tiny_run.run, tiny_run.history  # fit(build_config(tiny(learnable_betons)), run)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 60.0  # chance is 10%
    files = {p.name for p in run.path.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "train.log", "summary.json", "tb",
            "checkpoint_last.pt", "checkpoint_best.pt"} <= files
    assert list((run.path / "tb").glob("events.out.tfevents.*"))
    assert run.metrics() == history
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_correct",
                               "test_count"}  # no timings: those vary between reruns, so they live in timing.jsonl
    timing = [json.loads(line) for line in (run.path / "timing.jsonl").read_text().splitlines()]
    assert [t["epoch"] for t in timing] == [1, 2, 3] and all(t["seconds"] > 0 < t["images_per_s"] for t in timing)
    state = torch.load(run.last, weights_only=True)
    assert state["epoch"] == 3 and "model" in state and "optimizer" in state
    log = (run.path / "train.log").read_text()
    assert "Test set: Average loss:" in log and "Accuracy:" in log


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["onecycle", "plateau"])
def test_resume_gives_the_same_metrics_and_weights(learnable_betons, tmp_path, scheduler):
    # 5 batches an epoch: what is tested is the state that crosses the stop, not the amount of training
    cfg = build_config(tiny(learnable_betons, scheduler__name=scheduler, train__precision="fp32", data__subset=500,
                            data__test_subset=100))
    whole = RunDir(tmp_path / "whole")
    fit(cfg, whole)
    stopped = RunDir(tmp_path / "stopped")
    fit(cfg, stopped, stop_after=1)
    assert len(stopped.metrics()) == 1
    fit(cfg, stopped, resume=True)
    assert (stopped.path / "metrics.jsonl").read_bytes() == (whole.path / "metrics.jsonl").read_bytes()
    a = torch.load(whole.last, weights_only=True)["model"]
    b = torch.load(stopped.last, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_stops_with_a_clear_error(learnable_betons, tmp_path):
    cfg = build_config(tiny(learnable_betons, optimizer__lr=1e12, scheduler__name="none", train__epochs=1,
                            data__subset=300))
    with pytest.raises(Diverged, match="loss became"):
        fit(cfg, RunDir(tmp_path / "nan"))


def test_sweep_fills_results_and_skips_complete_runs(learnable_betons, tmp_path):
    import yaml

    configs = tmp_path / "configs"
    configs.mkdir()
    for norm in ("batch", "layer"):
        raw = tiny(learnable_betons, train__epochs=1, data__subset=400, data__test_subset=100)
        raw["name"], raw["model"]["norm"] = f"tiny_{norm}", norm
        (configs / f"tiny_{norm}.yaml").write_text(yaml.safe_dump(raw))
    results = sweep([configs], [], tmp_path / "runs", log=lambda line: None)
    table = results.read_text()
    assert table.count("| fastnet | ") == 2 and "| layer |" in table and "| batch |" in table
    assert "Training Accuracy" in table and "tiny_layer.yaml" in table
    seen = []
    sweep([configs], [], tmp_path / "runs", log=seen.append)
    assert [line.split()[0] for line in seen] == ["skip", "skip", "results:", "#", "sweep"]
    assert seen[-1].startswith(f"sweep done: tiny_batch {json.loads((tmp_path / 'runs/tiny_batch/summary.json').read_text())['test_acc']:.2f}%, tiny_layer ")
    assert " min " in seen[-1] and seen[-1].endswith(f" on {hardware.machine()}") and " cores" in seen[-1]


def test_a_run_saved_before_a_config_key_existed_is_the_same_config(learnable_betons):
    # a sweep must skip or resume the runs of earlier releases, not call them another config's: a key added
    # since (here every one at its default, one at a time) takes its default
    from train.sweep import _same_config

    cfg = build_config(tiny(learnable_betons))
    saved, defaults = cfg.to_dict(), build_config({}).to_dict()
    for section, keys in saved.items():
        for key in keys if isinstance(keys, dict) else ():
            if keys[key] != defaults[section][key]:
                continue
            older = json.loads(json.dumps(saved))
            del older[section][key]
            assert _same_config(older, cfg), f"{section}.{key}"
    changed = json.loads(json.dumps(saved))
    changed["optimizer"]["lr"] = 0.2
    assert not _same_config(changed, cfg)
    assert not _same_config({"train": {"epochs": "many"}}, cfg)  # not a config at all


def test_a_budgeted_run_is_the_same_config_as_its_budget(learnable_betons):
    from train.sweep import _same_config

    wanted = build_config(tiny(learnable_betons, train__epochs=8, train__budget="8m"))
    saved = wanted.to_dict()
    plan = {"seconds": 480.0, "max_epochs": 8, "epochs": 3, "train_seconds": 100.0, "eval_seconds": 5.0}
    saved["train"].update(budget=None, epochs=4, budget_plan={**plan, "corrected_at_epoch": 1})
    assert _same_config(saved, wanted)
    saved["train"]["epochs"] = 9  # more than the config allows
    assert not _same_config(saved, wanted)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr()


def json_of(args, capsys) -> dict:
    """The JSON line a `--json` command prints last, the command having succeeded."""
    code, out = run_cli(args, capsys)
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_cli_train_and_resume(learnable_betons, tmp_path, capsys):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons, train__epochs=1)))
    code, out = run_cli(["train", str(config), "--out", str(tmp_path / "r"), "--subset", "400"], capsys)
    assert code == 0 and "done: final test accuracy" in out.out, out.err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["complete"]
    assert (tmp_path / "r" / "report.md").is_file()  # train ends with the analysis
    code, out = run_cli(["train", "--resume", str(tmp_path / "r"), "--no-analyze"], capsys)
    assert code == 0  # nothing left to do: resumes after the last epoch and ends


def test_a_continued_run_may_change_how_it_runs_not_what_it_trains(learnable_betons, tmp_path, capsys):
    """config.RUN_SETTINGS (checkpoint_every, workers, ...) may change when a run is continued, by `train --resume
    --set` or by a sweep; anything else is another experiment."""
    import yaml

    raw = tiny(learnable_betons, train__epochs=2, data__subset=300, data__test_subset=100)
    run = RunDir(tmp_path / "runs" / "tiny")
    fit(build_config(raw), run, stop_after=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    code, out = run_cli(["sweep", str(config), "--out", str(tmp_path / "runs"), "--no-analyze",
                         "--set", "train.checkpoint_every=2"], capsys)
    assert code == 0 and "resume tiny" in out.out, out.err
    assert [m["epoch"] for m in run.metrics()] == [1, 2] and run.config()["train"]["checkpoint_every"] == 2
    code, out = run_cli(["train", "--resume", str(run.path), "--set", "data.workers=1", "--no-analyze"], capsys)
    assert code == 0, out.err
    assert (run.config()["train"]["checkpoint_every"], run.config()["data"]["workers"]) == (2, 1)
    code, out = run_cli(["sweep", str(config), "--out", str(tmp_path / "runs"), "--no-analyze",
                         "--set", "optimizer.lr=0.2"], capsys)
    assert code == 2 and "holds a run of a different config (optimizer.lr: " in out.err  # names what differs
    assert f"-> 0.2); pick another --out for this sweep, or remove {run.path} to train it again" in out.err
    assert len(out.err.strip().splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet99", "unknown model"),
    ("optimizer.name=lion", "optimizer.name"),
    ("scheduler.name=warmup", "scheduler.name"),
    ("train.epochs=-3", "train.epochs"),
    ("train.epochs=many", "train.epochs"),
    ("trian.epochs=3", "unknown key"),
    ("data.beton_dir=/nonexistent/betons", "/nonexistent/betons"),
    ("data.augment=[{cutout: {size: 99}}]", "Cutout.size"),
])
def test_bad_config_is_one_line_exit_2(learnable_betons, tmp_path, capsys, override, message):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons)))
    code, out = run_cli(["train", str(config), "--set", override, "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert out.err.startswith("error: ") and out.err.count("\n") == 1 and message in out.err
    assert "Traceback" not in out.err
    assert not (tmp_path / "r").exists()  # a failed start leaves no run folder


def test_missing_config_and_resume_of_a_folder_that_is_no_run(tmp_path, capsys):
    code, out = run_cli(["train", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "config not found" in out.err
    code, out = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert code == 2 and "not a run folder" in out.err


@pytest.mark.slow
def test_max_lr_find_runs_the_range_test_and_stores_the_number(learnable_betons, tmp_path):
    run = RunDir(tmp_path / "find")
    # the range test's 100 steps at batch 50 (half the compute of batch 100), one epoch of 10 batches after it
    fit(build_config(tiny(learnable_betons, scheduler__max_lr="find", train__epochs=1, data__batch_size=50,
                          data__subset=500, data__test_subset=100)), run)
    max_lr = run.config()["scheduler"]["max_lr"]
    assert isinstance(max_lr, float) and 1e-7 <= max_lr <= 10
    log = (run.path / "train.log").read_text()
    assert "valley" in log and "LR range test" in next(line for line in log.splitlines() if " start-up " in line)
    found = json.loads((run.path / "lr_find.json").read_text())  # the range test beside the number it gave
    assert found["suggestions"]["valley"] == max_lr and (run.path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_rerun_gives_identical_metrics_and_weights(learnable_betons, tiny_run, tmp_path):
    cfg = build_config(tiny(learnable_betons))
    first, second = tiny_run.run, RunDir(tmp_path / "b")  # first: fit(cfg, first), earlier in this process
    fit(cfg, second)
    assert (first.path / "metrics.jsonl").read_bytes() == (second.path / "metrics.jsonl").read_bytes()
    a = torch.load(first.last, weights_only=True)["model"]
    b = torch.load(second.last, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
