"""The speed recipe's options as a user sets them in a config: airnet with its whitening init from the
betons, parameter roles with Muon, the linear schedule, the frozen whitening bias, EMA and TTA."""
from __future__ import annotations

import pytest
import torch

from beton.errors import UserError
from train.config import OptimizerConfig, SchedulerConfig, build_config
from train.loop import fit
from train.optim import build_schedule
from train.run import RunDir
from train.parts import build

from .test_train import json_of, tiny

ROLES = {"filters": {"name": "muon", "lr": 0.2, "momentum": 0.6, "nesterov": True, "ns_steps": 3,
                     "renormalize": True},
         "norm_biases": {"name": "sgd", "lr": 2.0, "momentum": 0.85, "nesterov": True},
         "whitening_bias": {"name": "sgd", "lr": 2.0, "momentum": 0.85, "nesterov": True},
         "head": {"name": "sgd", "lr": 20.0, "momentum": 0.85, "nesterov": True}}


def speedy(betons, **over) -> dict:
    raw = tiny(betons, **over)
    raw["model"] = {"name": "airnet", "options": {"widths": [16, 32, 32]}}
    raw["optimizer"] = {"name": "roles", "roles": ROLES}
    raw["scheduler"] = {"name": "linear"}
    raw["train"].update(label_smoothing=0.2, precision="fp32", whitening_bias_epochs=1, epochs=2)
    return raw


def test_airnet_whitening_comes_from_the_training_images(learnable_betons):
    s = build(build_config(speedy(learnable_betons)))
    conv = s.model.whiten
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    from train.models.airnet import patch_covariance
    from train.models.airnet import whitening_images

    images = torch.as_tensor(whitening_images(s.cfg.data)).permute(0, 3, 1, 2).float()
    import json

    manifest = json.loads((learnable_betons / "manifest.json").read_text())
    x = (images - torch.tensor(manifest["mean"]).view(1, 3, 1, 1)) / torch.tensor(manifest["std"]).view(1, 3, 1, 1)
    out = torch.nn.functional.conv2d(x, conv.weight.float(), conv.bias.float())
    half = out[:, :12]  # the +v copies; the -v ones mirror them
    flat = half.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(flat.T)
    big = torch.linalg.eigvalsh(cov)
    assert big.max() < 1.05 and flat.mean(0).abs().max() < 0.05  # whitened: no direction above unit variance


@pytest.mark.slow
def test_speed_recipe_trains_resumes_exactly_and_freezes_the_whitening_bias(learnable_betons, tmp_path):
    raw = speedy(learnable_betons, train__ema_decay=0.5, train__ema_every=2)
    raw["eval"] = {"tta": "flip", "tta_last_only": True}
    cfg = build_config(raw)
    whole = RunDir(tmp_path / "whole")
    history = fit(cfg, whole)
    assert history[-1]["test_acc"] > 20.0  # chance is 10%
    assert "tta" not in history[0] and history[-1]["tta"] == "flip"  # the line says which evaluation used TTA
    epoch_lines = [line for line in (whole.path / "train.log").read_text().splitlines() if " epoch " in line]
    assert "Test set: " in epoch_lines[0] and "Test set (TTA flip): " in epoch_lines[-1]
    stopped = RunDir(tmp_path / "stopped")
    fit(cfg, stopped, stop_after=1)
    after_one = torch.load(stopped.last, weights_only=True)
    fit(cfg, stopped, resume=True)
    assert stopped.metrics() == history  # roles optimizer, EMA and schedule state all round-trip
    final = torch.load(stopped.last, weights_only=True)
    key = "stem.whiten.bias"
    assert torch.equal(after_one["model"][key], final["model"][key])  # frozen after epoch 1
    assert not torch.equal(after_one["model"]["layer1.conv1.weight"], final["model"]["layer1.conv1.weight"])
    assert final["ema"]["steps"] == 2 * 10 and final["ema"]["updates"] == 10

    from analysis.predictions import load_run

    loaded = load_run(stopped.path, "last")  # the analysis evaluates what training evaluated: the average
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value.cpu(), final["ema"]["average"][name]), name


def test_tta_changes_the_evaluation_and_flip_is_mirror_invariant(learnable_betons):
    from train.loop import evaluate

    plain = build(build_config(speedy(learnable_betons)))
    flipped = build(build_config({**speedy(learnable_betons), "eval": {"tta": "flip"}}))
    flipped.model.load_state_dict(plain.model.state_dict())
    a, b = evaluate(plain, plain.model), evaluate(flipped, flipped.model)
    assert a.count == b.count and a.loss != b.loss
    assert evaluate(flipped, flipped.model, tta=False).loss == pytest.approx(a.loss, rel=1e-6)
    with pytest.raises(UserError, match="tta"):
        build_config({"eval": {"tta": "rotate"}})


def test_linear_schedule_decays_every_group_to_end_factor():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 1.0},
                           {"params": model[1].parameters(), "lr": 0.1}])
    schedule = build_schedule(opt, SchedulerConfig(name="linear", warmup_epochs=1, end_factor=0.1), 4, 5, 1.0)
    trace = []
    for _ in range(20):
        trace.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.after_batch()
    assert trace[0] == pytest.approx([1 / 6, 0.1 / 6]) and trace[5] == pytest.approx([1.0, 0.1])
    assert trace[-1][0] == pytest.approx(1 - 0.9 * 14 / 15) and trace[-1][1] == pytest.approx(trace[-1][0] / 10)


def test_roles_optimizer_errors_are_one_line(learnable_betons):
    with pytest.raises(UserError, match="optimizer.roles"):
        OptimizerConfig(name="roles")
    cfg = build_config({**speedy(learnable_betons), "optimizer": {"name": "roles", "roles": {"filters": ROLES["filters"]}}})
    with pytest.raises(UserError, match="no entry for role"):
        from train.state import start_training

        start_training(build(cfg))
    with pytest.raises(UserError, match="model.options"):
        build(build_config({**speedy(learnable_betons), "model": {"name": "airnet", "options": {"depth": 3}}}))


def speedy_yaml(raw: dict, tmp_path) -> str:
    """The experiment `raw` as a YAML file a user would pass to a command: its path."""
    import yaml

    config = tmp_path / "speedy.yaml"
    config.write_text(yaml.safe_dump(raw))
    return str(config)


def test_bench_speedrun_json(learnable_betons, tmp_path, capsys):
    raw = speedy(learnable_betons, train__epochs=1)
    raw["eval"] = {"tta": "flip", "tta_last_only": True}
    r = json_of(["bench", "speedrun", speedy_yaml(raw, tmp_path), "--runs", "2", "--json"], capsys)
    assert len(r["accuracies"]) == 2 and len(r["seconds"]) == 2
    assert r["mean_accuracy"] == pytest.approx(sum(r["accuracies"]) / 2)
    assert r["mean_seconds"] == pytest.approx(sum(r["seconds"]) / 2)
    assert all(0 <= s for s in r["setup_seconds"]) and all(a > 10 for a in r["accuracies"])


def test_bench_train_takes_the_speed_recipe_with_its_per_role_schedule(learnable_betons, tmp_path, capsys):
    """bench train times the loop without the schedule; a config with scheduler.role_epochs (speed94's) must not
    make that a config error."""
    raw = speedy(learnable_betons)
    raw["scheduler"]["role_epochs"] = {"whitening_bias": 1}
    r = json_of(["bench", "train", "--config", speedy_yaml(raw, tmp_path), "--batch-size", "50", "--steps", "1",
                 "--rounds", "1", "--json"], capsys)
    assert r["loop_efficiency"] > 0 and r["loop_real_loader"] > 0


@pytest.mark.slow
def test_compile_trains_the_speed_model_as_eager_does_and_speedrun_reports_its_compile_apart(learnable_betons,
                                                                                              tmp_path, capsys):
    """speedrun's run 0 (seeds 0) is the eager run below compiled: same experiment, same accuracy to rounding."""
    raw = speedy(learnable_betons, train__seed=0)
    raw["data"]["seed"] = 0
    eager = fit(build_config(raw), RunDir(tmp_path / "eager"))

    raw["train"]["compile"] = True
    r = json_of(["bench", "speedrun", speedy_yaml(raw, tmp_path), "--runs", "1", "--json"], capsys)
    assert r["compile_seconds"] > 0 and eager[-1]["test_acc"] > 20.0  # chance is 10%
    assert abs(r["accuracies"][0] - eager[-1]["test_acc"]) <= 2.0
