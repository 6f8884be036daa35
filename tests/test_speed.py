"""Speed settings resolved by measurement: `precision: auto` on the CPU and `train.budget`."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beton.errors import UserError
from train import speed
from train.config import build_config
from train.loop import fit
from train.run import RunDir
from train.setup import build

from .test_train import json_of, tiny


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured again: the saved config or the cache should have answered")


@pytest.mark.parametrize("rates, expected", [({"fp32": 100.0, "bf16": 50.0}, "fp32"),
                                             ({"fp32": 50.0, "bf16": 100.0}, "bf16")])
def test_precision_auto_follows_the_measurement_and_caches_it(learnable_betons, tmp_path, monkeypatch, rates,
                                                              expected):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "measure_precisions", lambda *a, **k: dict(rates))
    cfg = build_config(tiny(learnable_betons, train__precision="auto"))
    s = build(cfg)
    assert s.precision.name == expected and s.cfg.train.precision == expected
    assert "fp32 100.0 vs bf16 50.0" in s.notes[0] or "fp32 50.0 vs bf16 100.0" in s.notes[0]
    monkeypatch.setattr(speed, "measure_precisions", _no_measuring)  # the second run reads the cache
    assert build(cfg).precision.name == expected


def test_precision_auto_is_logged_and_saved_resolved(learnable_betons, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "measure_precisions", lambda *a, **k: {"fp32": 80.0, "bf16": 20.0})
    run = RunDir(tmp_path / "run")
    fit(build_config(tiny(learnable_betons, train__precision="auto", train__epochs=1)), run)
    assert run.config()["train"]["precision"] == "fp32"
    assert "precision auto -> fp32: fp32 80.0 vs bf16 20.0 images/s" in (run.path / "train.log").read_text()


def test_the_real_measurement_times_both_precisions(learnable_betons):
    cfg = build_config(tiny(learnable_betons, train__precision="fp32"))
    s = build(cfg)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    rates = speed.measure_precisions(cfg, s.model, s.device, 10, steps=1)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert all((v == s.model.state_dict()[k]).all() for k, v in before.items())  # measured on a copy


@pytest.mark.parametrize("budget, spent, train_s, eval_s, cap, expected", [
    (600, 20, 50, 8, 100, 10), (600, 20, 50, 8, 5, 5), (60, 50, 50, 8, 100, 1), (100, 0, 25, 0, 100, 4)])
def test_budget_epochs(budget, spent, train_s, eval_s, cap, expected):
    assert speed.budget_epochs(budget, spent, train_s, eval_s, cap) == expected


@pytest.mark.slow
def test_budget_fixes_the_epochs_and_resume_and_reruns_need_no_timing(learnable_betons, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "epoch_seconds", lambda s: (20.0, 5.0))  # 25 s an epoch
    cfg = build_config(tiny(learnable_betons, train__precision="fp32", train__epochs=50, train__budget="100s",
                            data__subset=200, data__test_subset=100))  # 4 runs: the epochs' length is not the point
    whole = RunDir(tmp_path / "whole")
    history = fit(cfg, whole)
    saved = whole.config()["train"]
    assert saved["budget"] is None and saved["epochs"] == len(history) == 3  # (100 s - start-up) // 25 s
    assert "train.budget 100s: 3 epochs" in (whole.path / "train.log").read_text()

    monkeypatch.setattr(speed, "epoch_seconds", _no_measuring)
    stopped = RunDir(tmp_path / "stopped")
    monkeypatch.setattr(speed, "epoch_seconds", lambda s: (20.0, 5.0))
    fit(cfg, stopped, stop_after=1)
    monkeypatch.setattr(speed, "epoch_seconds", _no_measuring)
    fit(build_config(stopped.config()), stopped, resume=True)
    assert stopped.metrics() == history

    rerun = RunDir(tmp_path / "rerun")
    assert fit(build_config(whole.config()), rerun) == history


def test_budget_errors_are_one_line(learnable_betons):
    for bad in ("10x", "0s", "-5m"):
        with pytest.raises(UserError, match="train.budget"):
            build_config(tiny(learnable_betons, train__budget=bad))


def test_bench_train_json_reports_both_precisions_and_what_auto_picks(learnable_betons, tmp_path, capsys):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons, train__precision="fp32")))
    r = json_of(["bench", "train", "--config", str(config), "--batch-size", "50", "--steps", "1", "--json"], capsys)
    for key in ("fp32_nchw", "fp32_channels_last", "bf16_channels_last", "loop_real_loader", "loop_synthetic"):
        assert r[key] > 0
    assert r["auto"] == ("bf16" if r["bf16_channels_last"] > r["fp32_channels_last"] else "fp32")
    assert r["precision"] == "fp32" and r["channels_last_autocast"] == r["fp32_channels_last"]
    assert 0 < r["loop_efficiency"]
    assert r["reuse_memory"] is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


_FAULTS = """
import resource, sys, torch
from train.hardware import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else False
def step():  # a training step's large blocks: allocated, written, freed
    x = torch.empty(16 << 20)  # 64 MB, above glibc's largest mmap threshold (32 MB)
    x.fill_(1.0)
    del x
for _ in range(5):  # the first steps fault their memory in either way (until the heap's layout settles)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not platform.libc_ver()[0] == "glibc",
                    reason="glibc's malloc only")
def test_reused_memory_is_not_faulted_in_again_at_every_step():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent.parent).stdout.split()
        return out[0] == "True", int(out[1])

    (applied_off, off), (applied_on, on) = faults("off"), faults("on")
    assert not applied_off and applied_on
    assert off > 4 * 16000  # 64 MB is 16,384 pages, mapped and faulted again at every step
    assert on < 1000, on  # the freed block is reused


@pytest.mark.parametrize("reuse", [True, False])
def test_build_reuses_freed_memory_on_the_cpu_unless_told_not_to(learnable_betons, monkeypatch, reuse):
    from train import setup

    calls = []
    monkeypatch.setattr(setup, "reuse_freed_memory", lambda: calls.append(1))
    build(build_config(tiny(learnable_betons, train__reuse_memory=reuse, train__precision="fp32")))
    assert calls == ([1] if reuse else [])


def test_the_precision_cache_tells_reused_memory_apart(monkeypatch):
    """fp32 and bf16 gain by different factors when freed memory is reused: one must not answer for the other."""
    cfg = build_config({"name": "k"})
    device = torch.device("cpu")
    monkeypatch.setattr(speed, "reusing_freed_memory", lambda: False)
    plain = speed.cache_key(cfg, device)
    monkeypatch.setattr(speed, "reusing_freed_memory", lambda: True)
    assert speed.cache_key(cfg, device) != plain
