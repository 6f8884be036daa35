"""`precision: auto` on the CPU, resolved by measurement and cached (train.precision), and bench train's
report of it."""
from __future__ import annotations

import platform
import sys

import pytest
import torch
import train.precision

from train.config import build_config
from train.loop import fit
from train.parts import build
from train.run import RunDir

from .test_train import json_of, run_cli, tiny


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured again: the saved config or the cache should have answered")


@pytest.mark.parametrize("rates, expected", [({"fp32": 100.0, "bf16": 50.0}, "fp32"),
                                             ({"fp32": 50.0, "bf16": 100.0}, "bf16")])
def test_precision_auto_follows_the_measurement_and_caches_it(learnable_betons, tmp_path, monkeypatch, rates,
                                                              expected):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train.precision, "measure_precisions", lambda *a, **k: dict(rates))
    cfg = build_config(tiny(learnable_betons, train__precision="auto"))
    s = build(cfg)
    assert s.precision.name == expected and s.cfg.train.precision == expected
    assert "fp32 100.0 vs bf16 50.0" in s.notes[0] or "fp32 50.0 vs bf16 100.0" in s.notes[0]
    monkeypatch.setattr(train.precision, "measure_precisions", _no_measuring)  # the second run reads the cache
    assert build(cfg).precision.name == expected


def test_precision_auto_is_logged_and_saved_resolved(learnable_betons, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train.precision, "measure_precisions", lambda *a, **k: {"fp32": 80.0, "bf16": 20.0})
    run = RunDir(tmp_path / "run")
    fit(build_config(tiny(learnable_betons, train__precision="auto", train__epochs=1)), run)
    assert run.config()["train"]["precision"] == "fp32"
    assert "precision auto -> fp32: fp32 80.0 vs bf16 20.0 images/s" in (run.path / "train.log").read_text()


def test_the_real_measurement_times_both_precisions(learnable_betons):
    cfg = build_config(tiny(learnable_betons, train__precision="fp32"))
    s = build(cfg)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    rates = train.precision.measure_precisions(cfg, s.model, s.device, 10, steps=1)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert all((v == s.model.state_dict()[k]).all() for k, v in before.items())  # measured on a copy


def test_the_probe_takes_turns_and_rates_each_precision_by_its_fastest_step(learnable_betons, monkeypatch):
    """A slow spell of the machine (bf16's first timed step at a sixth of its speed, as an AMX Xeon's units do
    for seconds at a time) must not decide the choice: timed turn about and rated by the fastest step, bf16 (10 ms
    a step) beats fp32 (20 ms), where the mean of each one's steps (bf16 26.7 ms) would have picked fp32."""
    cfg = build_config(tiny(learnable_betons, train__precision="fp32"))
    s = build(cfg)
    clock, calls = [0.0], []
    durations = {"fp32": iter([0.5, 0.02, 0.02, 0.02]), "bf16": iter([0.5, 0.06, 0.01, 0.01])}  # warm-up first

    def fake_step(step, images, labels):
        calls.append(step.precision.name)
        clock[0] += next(durations[step.precision.name])
        return torch.zeros(()), None

    monkeypatch.setattr(train.precision, "train_step", fake_step)
    monkeypatch.setattr(train.precision.time, "perf_counter", lambda: clock[0])
    rates = train.precision.measure_precisions(cfg, s.model, s.device, 10, steps=3)
    assert calls == ["fp32", "bf16"] * 4  # one warm-up step each, then turn about
    batch = train.precision.probe_batch(cfg)
    assert rates == pytest.approx({"fp32": batch / 0.02, "bf16": batch / 0.01})
    assert train.precision.chosen_precision(s.device, rates) == "bf16"


def test_bench_train_json_reports_both_precisions_and_what_auto_picks(learnable_betons, tmp_path, capsys):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons, train__precision="fp32")))
    r = json_of(["bench", "train", "--config", str(config), "--batch-size", "50", "--steps", "1", "--rounds", "1",
                 "--json"], capsys)
    for key in ("fp32_nchw", "fp32_channels_last", "bf16_channels_last", "loop_real_loader", "loop_synthetic"):
        assert r[key] > 0
    assert r["auto"] == ("bf16" if r["bf16_channels_last"] > r["fp32_channels_last"] else "fp32")
    assert r["precision"] == "fp32" and r["channels_last_autocast"] == r["fp32_channels_last"]
    assert 0 < r["loop_efficiency"]
    assert r["reuse_memory"] is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


def test_bench_train_takes_the_configs_batch_and_loop_only_skips_the_precisions(learnable_betons, tmp_path, capsys):
    """Without --batch-size, bench train times the config's own batch (it once timed 128 whatever the config
    said); --loop-only measures the loop and the loader alone, in alternating rounds."""
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons, data__batch_size=40)))
    r = json_of(["bench", "train", "--config", str(config), "--steps", "2", "--rounds", "2", "--loop-only", "--json"],
                capsys)
    assert r["batch_size"] == 40 and r["rounds"] == 2
    assert "fp32_nchw" not in r and "auto" not in r
    low, high = r["loop_efficiency_range"]
    assert 0 < low <= r["loop_efficiency"] <= high
    assert r["loader_cpu_ms_per_image"] > 0 and r["step_cpu_ms_per_image"] > 0
    assert isinstance(r["real_loop_extra_cpu_ms_per_image"], float)  # noise can make it negative
    assert r["epoch_start_seconds"] > 0 and 0 < r["loop_efficiency_epoch"]
    assert r["loader_cpu_share"] == pytest.approx(
        r["loader_cpu_ms_per_image"] / (r["loader_cpu_ms_per_image"] + r["step_cpu_ms_per_image"]))


def test_bench_loop_measures_every_config_of_a_folder_and_checks_them_all_first(learnable_betons, tmp_path, capsys):
    import yaml

    folder = tmp_path / "configs"
    folder.mkdir()
    for name, batch in (("a", 50), ("b", 25)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(tiny(learnable_betons, data__batch_size=batch)))
    code, out = run_cli(["bench", "loop", str(folder), "--steps", "1", "--rounds", "1"], capsys)
    assert code == 0, out.err
    rows = [line for line in out.out.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{folder / 'a.yaml'}`", f"`{folder / 'b.yaml'}`"]
    assert [row.split("|")[3].strip() for row in rows] == ["50", "25"]
    # a broken config anywhere in the list stops the command before anything is timed
    (folder / "c.yaml").write_text(yaml.safe_dump(tiny(learnable_betons, optimizer__lr=-1)))
    code, out = run_cli(["bench", "loop", str(folder), "--steps", "1"], capsys)
    assert code == 2 and out.err.startswith("error: ") and len(out.err.strip().splitlines()) == 1
    assert out.out == ""


def test_bench_steps_compares_configs_one_step_of_each_in_turn(learnable_betons, tmp_path, capsys, monkeypatch):
    """Real steps of two configs through the CLI (a table, one row each, checked before any timing), then the
    timing itself on a scripted clock: the steps alternate, and a slow spell that hits one round of both does
    not change the paired ratio (the second config's step costs twice the first's per image in every round)."""
    import yaml

    import train.bench

    folder = tmp_path / "configs"
    folder.mkdir()
    for name, batch in (("a", 50), ("b", 25)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(tiny(learnable_betons, data__batch_size=batch)))
    code, out = run_cli(["bench", "steps", str(folder), "--rounds", "2"], capsys)
    assert code == 0, out.err
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.out.splitlines() if line.startswith("| `")]
    assert [(row[0], row[2], row[3], row[8]) for row in rows] == [
        (f"`{folder / 'a.yaml'}`", "50", "bf16", "1.000"), (f"`{folder / 'b.yaml'}`", "25", "bf16", rows[1][8])]
    assert all(0 < float(row[4]) <= float(row[5]) <= float(row[6]) for row in rows)
    (folder / "c.yaml").write_text(yaml.safe_dump(tiny(learnable_betons, optimizer__lr=-1)))
    code, out = run_cli(["bench", "steps", str(folder)], capsys)
    assert code == 2 and out.err.startswith("error: ") and len(out.err.strip().splitlines()) == 1 and out.out == ""

    clock, calls = [0.0], []
    per_image = {50: 0.001, 25: 0.002}  # seconds per image of a step, before the slow spell's factor
    spell = iter([1, 1, 1, 1, 1, 1, 3, 3, 1, 1])  # warm-up (2 each), then rounds 1-3 in turn: round 2 is slow

    def fake_step(step, images, labels):
        calls.append(len(labels))
        clock[0] += per_image[len(labels)] * len(labels) * next(spell)
        return torch.zeros(()), None

    monkeypatch.setattr(train.precision, "train_step", fake_step)  # the turn-about timer bench steps shares
    monkeypatch.setattr(train.precision.time, "perf_counter", lambda: clock[0])
    from train.config import load_config

    first, second = train.bench.turn_about([load_config(folder / "a.yaml"), load_config(folder / "b.yaml")], rounds=3)
    assert calls == [50, 50, 25, 25] + [50, 25] * 3  # warm-up steps, then one of each in turn
    assert first["ms_per_image"] == pytest.approx([1.0, 3.0, 1.0]) and first["vs_first"] == 1.0
    assert second["ms_per_image"] == pytest.approx([2.0, 6.0, 2.0]) and second["vs_first"] == pytest.approx(2.0)
    assert (second["fastest_ms"], second["median_ms"], second["slowest_ms"]) == pytest.approx((2.0, 2.0, 6.0))


def test_bench_machine_reports_the_spread_of_its_windows(capsys):
    r = json_of(["bench", "machine", "--seconds", "1", "--json"], capsys)
    assert r["machine"]
    for name in ("float32", "bfloat16"):
        found = r[name]
        assert found["gflops"] and min(found["gflops"]) > 0
        assert found["min"] <= found["median"] <= found["max"]
        assert found["max_over_min"] == pytest.approx(found["max"] / found["min"])


def test_the_precision_cache_tells_reused_memory_apart(monkeypatch):
    """fp32 and bf16 gain by different factors when freed memory is reused: one must not answer for the other."""
    cfg = build_config({"name": "k"})
    device = torch.device("cpu")
    monkeypatch.setattr(train.precision, "reusing_freed_memory", lambda: False)
    plain = train.precision.cache_key(cfg, device)
    monkeypatch.setattr(train.precision, "reusing_freed_memory", lambda: True)
    assert train.precision.cache_key(cfg, device) != plain
