"""The configs named after the seeds run what ../shared/seeds.md says each seed ran, and a sweep over
them runs (one epoch on a tiny synthetic subset: the configs, not the accuracy, are the subject)."""
from __future__ import annotations

from pathlib import Path

import pytest

from train.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GRID = sorted((CONFIGS / "seeds").glob("*.yaml"))


def test_the_grid_is_twelve_runs_of_seed_a():
    names = {(c.model.name, c.model.norm, c.scheduler.name) for c in map(load_config, GRID)}
    assert names == {(m, n, s) for m in ("resnet18", "resnet34") for n in ("batch", "layer")
                     for s in ("onecycle", "step", "plateau")}


@pytest.mark.parametrize("path", GRID + [CONFIGS / "final_resnet18_layernorm.yaml"], ids=lambda p: p.stem)
def test_seed_a_facts(path):
    c = load_config(path)
    text = path.read_text()
    assert text.startswith("# Seed A") and "seeds.md" in text
    assert "Where fastcifar differs" in text or "Not from the seed" in text  # what is ours, said apart
    assert c.model.strides == [1, 1, 2, 2]
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.betas) == \
        ("adam", 0.001, 1e-4, [0.9, 0.999])
    assert (c.data.batch_size, c.data.drop_last, c.train.epochs) == (256, False, 40)
    assert (c.train.grad_clip_value, c.train.grad_clip, c.train.precision) == (0.1, None, "fp32")
    assert c.train.label_smoothing == 0.0
    crop, rotate, cutout = (a for a in c.data.augmentations())
    assert (type(crop).__name__, crop.size, crop.padding) == ("RandomCrop", 32, 4)
    assert (type(rotate).__name__, rotate.max_degrees, rotate.p) == ("RandomRotate", 5, 0.5)
    assert (type(cutout).__name__, cutout.size, cutout.p) == ("Cutout", 16, 0.5)
    assert [crop.fill, rotate.fill, cutout.fill] == ["reflect", "reflect", "mean"]
    s = c.scheduler
    if s.name == "plateau":
        assert (s.monitor, s.mode, s.factor, s.patience, s.min_lr) == ("test_acc", "max", 0.2, 3, 0.0)
    elif s.name == "onecycle":
        assert (s.max_lr, s.pct_start, s.div_factor, s.final_div_factor, s.anneal_strategy, s.cycle_momentum,
                s.peak_epoch, s.start_lr) == (0.001, 0.3, 25.0, 1e4, "cos", True, None, None)
    else:
        assert (s.name, s.step_size, s.gamma) == ("step", 10, 0.2)
        assert "did NOT run a StepLR" in text and "Not known, chosen: step_size 10, gamma 0.2" in text


def test_seed_b_c_d_facts():
    b = load_config(CONFIGS / "resnet18_layernorm_module_files_cv.yaml")
    assert (b.model.name, b.model.norm, b.model.strides, b.train.epochs, b.data.batch_size) == \
        ("resnet18", "layer", [1, 1, 2, 2], 40, 128)
    assert (b.optimizer.name, b.optimizer.lr, b.optimizer.momentum, b.optimizer.weight_decay) == ("sgd", 0.1, 0.9, 1e-3)
    assert (b.scheduler.name, b.scheduler.monitor, b.scheduler.factor, b.scheduler.patience) == \
        ("plateau", "test_loss", 0.1, 3)
    c = load_config(CONFIGS / "custom_resnet_onecycle.yaml")
    assert (c.model.name, c.train.epochs, c.data.batch_size) == ("custom_resnet", 24, 512)
    assert (c.scheduler.max_lr, c.scheduler.start_lr, c.scheduler.peak_epoch, c.scheduler.final_div_factor) == \
        ("find", "find", 5, 1.0)
    assert [type(a).__name__ for a in c.data.augmentations()] == ["RandomCrop", "RandomHorizontalFlip", "Cutout"]
    assert c.data.augmentations()[2].size == 8
    d = load_config(CONFIGS / "resnet18_plateau_20.yaml")
    assert (d.model.name, d.model.strides, d.train.epochs, d.data.batch_size) == ("resnet18", None, 20, 128)
    assert (d.optimizer.name, d.optimizer.lr, d.optimizer.momentum, d.optimizer.weight_decay) == \
        ("sgd", 0.1, 0.9, 5e-4)
    assert d.scheduler.name == "plateau" and d.data.val_split and d.train.select_best_on == "val"
    for path in (CONFIGS / "resnet18_layernorm_module_files_cv.yaml", CONFIGS / "custom_resnet_onecycle.yaml",
                 CONFIGS / "resnet18_plateau_20.yaml"):
        text = path.read_text()
        assert text.startswith("# Seed ") and "seeds.md" in text and "Not known" in text


def test_every_grid_config_builds_its_model_with_the_published_parameter_count():
    from train.models import create_model

    counts = {"resnet18": 11_173_962, "resnet34": 21_282_122}  # seeds.md: unchanged by the strides
    for path in GRID:
        c = load_config(path)
        assert sum(p.numel() for p in create_model(c.model).parameters()) == counts[c.model.name], path.stem


@pytest.mark.slow
def test_a_sweep_over_the_seed_grid_runs_and_fills_results(learnable_betons, tmp_path):
    """One run per scheduler row (ResNet18, both norms), in batches of one: every config of the grid trains
    through every command in test_shipped_configs; here the subject is the sweep's table."""
    from train.sweep import sweep

    picked = [CONFIGS / "seeds" / f"resnet18_{n}.yaml" for n in ("layer_onecycle", "batch_step", "layer_plateau")]
    overrides = [f"data.beton_dir={learnable_betons}", "train.epochs=1", "data.subset=4", "data.batch_size=1",
                 "data.test_subset=2", "data.workers=2"]
    results = sweep(picked, overrides, tmp_path / "sweep").read_text()
    rows = [line for line in results.splitlines() if line.startswith("| resnet18")]
    assert len(rows) == 3
    assert "| Best epoch | Time |" in results
    assert "11,173,962" in results


def test_speed94_is_airbench94_muons_recipe_in_fastcifars_units():
    """airbench sums the loss over the batch and sets SGD weight decay as wd / lr (torch's coupled form); ours
    is a batch mean, so its SGD LRs are times the batch and the decay re-expressed: the same update per step."""
    c = load_config(CONFIGS / "speed94.yaml")
    batch, bias_lr, head_lr, wd = 2000, 0.053, 0.67, 2e-6 * 2000  # airbench94_muon.py's main()
    roles = c.optimizer.roles
    assert c.data.batch_size == batch and c.train.epochs == 8 and c.train.label_smoothing == 0.2
    assert roles["filters"] == {"name": "muon", "lr": 0.24, "momentum": 0.6, "nesterov": True, "ns_steps": 3,
                                "renormalize": True}
    for role, lr in (("norm_biases", bias_lr), ("whitening_bias", bias_lr), ("head", head_lr)):
        r = roles[role]
        assert r["lr"] == pytest.approx(lr * batch, rel=1e-3) and (r["momentum"], r["nesterov"]) == (0.85, True)
        # per-step decay lr * weight_decay: airbench's lr * (wd / lr) = wd, ours (lr * batch) * w
        assert r["lr"] * r["weight_decay"] == pytest.approx(lr * (wd / lr), rel=2e-3)
    assert (c.scheduler.name, c.scheduler.end_factor, c.scheduler.role_epochs) == ("linear", 0.0, {"whitening_bias": 3})
    assert c.train.whitening_bias_epochs == 3
    assert [type(a).__name__ for a in c.data.augmentations()] == ["AlternatingFlip", "RandomCrop"]
    assert (c.data.augmentations()[1].padding, c.data.augmentations()[1].fill) == (2, "reflect")
    assert (c.eval.tta, c.eval.tta_last_only) == ("flip_translate", True)
