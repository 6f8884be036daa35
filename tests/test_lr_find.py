"""LR range test: exponential steps, bias-corrected smoothing, divergence stop, suggestions inside
the tested range, everything restored afterwards; `max_lr: find`; the CLI."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import yaml

from beton.errors import UserError
from fastcifar_cli import main
from train.config import LR_SUGGESTIONS, build_config
from train.loop import build
from train.lr_find import descent_start, lr_find, resolve_max_lr, suggestions
from train.optim import build_optimizer

from .test_train import tiny


@pytest.fixture(scope="module")
def setup(learnable_betons):
    return build(build_config(tiny(learnable_betons, data__batch_size=50)))


def snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def in_range(result) -> bool:
    lo, hi = result["lr"][0], result["lr"][-1]
    return all(result["start"] <= lo <= v <= hi <= result["end"] * (1 + 1e-9)
               for v in result["suggestions"].values())


def test_range_test_restores_everything_and_suggests_inside_the_range(setup):
    cfg = setup.cfg
    optimizer = build_optimizer(setup.model, cfg.optimizer)
    # give the optimizer some state (momentum buffers) worth restoring
    images, labels = next(iter(setup.train_loader))
    with setup.precision.autocast(setup.device):
        torch.nn.functional.cross_entropy(setup.model(images), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model_before, optimizer_before = snapshot(setup.model, optimizer)
    rng_before = torch.get_rng_state()
    epoch_before = setup.train_loader.epoch

    result = lr_find(cfg, start=1e-5, end=10.0, iters=20, parts=setup, optimizer=optimizer, progress=False)

    assert same_state(setup.model.state_dict(), model_before)
    assert same_state(optimizer.state_dict(), optimizer_before)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert setup.train_loader.epoch == epoch_before
    assert setup.model.training  # left as it was

    steps = result["steps"]
    assert 2 <= steps <= 20 and len(result["lr"]) == len(result["loss"]) == len(result["smoothed"]) == steps
    lrs = np.array(result["lr"])
    assert lrs[0] == pytest.approx(1e-5)
    assert np.allclose(lrs[1:] / lrs[:-1], (10.0 / 1e-5) ** (1 / 19))  # exponential steps
    avg, smoothed = 0.0, []
    for i, loss in enumerate(result["loss"]):  # EMA with bias correction
        avg = 0.98 * avg + 0.02 * loss
        smoothed.append(avg / (1 - 0.98 ** (i + 1)))
    assert np.allclose(smoothed, result["smoothed"])
    assert tuple(result["suggestions"]) == LR_SUGGESTIONS
    assert in_range(result)
    if result["stopped_early"]:
        best = min(result["smoothed"])
        assert (result["smoothed"][-1] > 4.0 * best or result["loss"][-1] > 4.0 * best
                or "loss became" in result["stop_reason"])


def test_divergence_stops_the_test(setup):
    result = lr_find(setup.cfg, start=1.0, end=1e8, iters=40, parts=setup, progress=False)
    assert result["stopped_early"] and result["steps"] < 40
    assert in_range(result)


def test_a_batch_loss_that_explodes_stops_the_test_though_the_smoothed_loss_lags(setup, monkeypatch):
    """Seed C's custom ResNet: the batch loss went 2.4 -> 23 between lr 1e-2 and 4e-2 while the smoothed loss
    (0.98, a 50-step lag) stayed under 4x its best, and the test ran on into the region where the net recovers."""
    from train import lr_find as module

    script = [2.3 - 0.01 * i for i in range(60)] + [50.0] + [1.0] * 20
    calls = []

    def scripted(step, images, labels):
        calls.append(len(calls))
        return torch.tensor(script[len(calls) - 1]), None

    monkeypatch.setattr(module, "train_step", scripted)
    result = lr_find(setup.cfg, start=1e-5, end=1.0, iters=80, parts=setup, progress=False)
    assert result["smoothed"][-1] < 4 * min(result["smoothed"])  # the smoothed loss alone would not have stopped
    assert len(calls) == 61 and result["steps"] == 61 and result["stop_reason"].startswith("batch loss 50.0000")


def test_suggestions_come_from_the_steps_before_the_smoothed_minimum():
    """After a divergence the loss can fall again as the net recovers: that fall is not a learning rate."""
    lrs = list(np.logspace(-7, 1, 81))
    # a fall over 25 steps to the minimum, an explosion, then a longer, steeper fall as the net recovers
    loss = list(np.linspace(4.7, 3.1, 25)) + list(np.linspace(3.2, 8.6, 10)) + list(np.linspace(8.6, 3.5, 46))
    lowest = lrs[24]
    s = suggestions(lrs, loss)
    assert all(lrs[0] <= v <= lowest for v in s.values()), s
    assert s["min/10"] == pytest.approx(lowest / 10) and s["minimum"] == lowest
    assert s["valley"] == pytest.approx(math.sqrt(lrs[0] * lowest))
    assert descent_start(lrs, loss) == lrs[0]


def test_suggestions_on_known_curves():
    lrs = list(np.logspace(-6, 1, 50))
    x = np.log10(lrs)
    # flat, then a descent between 1e-4 and 1e-1 (steepest at 1e-2.5), then a rise
    loss = 2.3 - 1.5 / (1 + np.exp(-3 * (x + 2.5))) + np.where(x > -1, 5 * (x + 1) ** 2, 0)
    s = suggestions(lrs, list(loss))
    assert all(lrs[0] <= v <= lrs[-1] for v in s.values())
    assert 10 ** -3 < s["steepest"] < 10 ** -2  # the steepest fall is at 10^-2.5
    assert 1e-5 < s["valley"] < 1e-1
    assert s["min/10"] == pytest.approx(lrs[int(np.argmin(loss))] / 10)
    rising = suggestions(lrs, list(np.linspace(1, 3, 50)))  # minimum at the first LR
    assert rising["min/10"] == lrs[0] and all(lrs[0] <= v <= lrs[-1] for v in rising.values())


def test_resolve_max_lr_uses_the_valley_and_keeps_the_weights(setup, learnable_betons):
    cfg = build_config(tiny(learnable_betons, scheduler__max_lr="find", data__batch_size=50))
    before = copy.deepcopy(setup.model.state_dict())
    lines = []
    resolved = resolve_max_lr(cfg, setup, log=lines.append, start=1e-4, iters=12)
    assert isinstance(resolved.scheduler.max_lr, float) and 1e-4 <= resolved.scheduler.max_lr <= 10
    assert cfg.scheduler.max_lr == "find"  # a copy, not changed in place
    assert resolved.optimizer == cfg.optimizer and resolved.model == cfg.model
    assert len(lines) == 1 and "max_lr" in lines[0] and "valley" in lines[0]
    assert same_state(setup.model.state_dict(), before)
    plain = build_config(tiny(learnable_betons))
    assert resolve_max_lr(plain, setup, log=lines.append) is plain and len(lines) == 1


def test_max_lr_rule_picks_the_suggestion_that_max_lr_find_takes(setup, learnable_betons):
    lines = []
    found = {}
    for rule in LR_SUGGESTIONS:
        cfg = build_config(tiny(learnable_betons, scheduler__max_lr="find", scheduler__max_lr_rule=rule,
                                data__batch_size=50))
        if not found:  # the range test is seeded: one run of it gives every rule's suggestion
            result = lr_find(cfg, start=1e-4, iters=12, parts=setup, progress=False)
        found[rule] = resolve_max_lr(cfg, setup, log=lines.append, start=1e-4, iters=12).scheduler.max_lr
        assert found[rule] == result["suggestions"][rule] and f"({rule} of a {result['steps']}-step" in lines[-1]
    assert found[rule] == resolve_max_lr(cfg, setup, log=lines.append, start=1e-4, iters=12).scheduler.max_lr
    assert found["min/10"] == pytest.approx(found["minimum"] / 10) or found["min/10"] == 1e-4
    with pytest.raises(UserError, match=r"^scheduler.max_lr_rule: unknown range-test suggestion 'lowest'; known: "
                                        r"steepest, valley, minimum, min/10$"):
        build_config(tiny(learnable_betons, scheduler__max_lr="find", scheduler__max_lr_rule="lowest"))


def test_cli_lr_find(learnable_betons, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons, data__batch_size=50)))
    out = tmp_path / "lr"
    with pytest.raises(SystemExit) as exc:
        main(["lr-find", str(config), "--iters", "10", "--start", "1e-4", "--out", str(out)])
    captured = capsys.readouterr()
    assert exc.value.code == 0, captured.err
    for name in LR_SUGGESTIONS:
        assert f"{name}:" in captured.out
    result = json.loads((out / "lr_find.json").read_text())
    assert in_range(result) and result["start"] == 1e-4 and result["iters"] == 10
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    for args, message in ((["--start", "1", "--end", "0.1"], "0 < start < end"),
                          (["--iters", "1"], "--iters"),
                          (["--set", "optimizer.lr=-1"], "optimizer.lr")):
        with pytest.raises(SystemExit) as exc:
            main(["lr-find", str(config), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_range_checks():
    cfg = build_config({})
    with pytest.raises(UserError, match="start < end"):
        lr_find(cfg, start=1e-3, end=1e-4)
    with pytest.raises(UserError, match="iters"):
        lr_find(cfg, iters=1)
    assert math.isclose(suggestions([1e-3, 1e-2], [1.0, 0.5])["min/10"], 1e-3)


def test_descent_start_is_where_the_longest_fall_begins():
    lrs = list(np.logspace(-6, 1, 50))
    loss = list(2.3 + 0.001 * np.arange(10)) + list(np.linspace(2.3, 0.5, 30)) + list(np.linspace(0.5, 5, 10))
    assert descent_start(lrs, loss) == pytest.approx(lrs[9])  # the rise ends at 9, the fall runs to 39
