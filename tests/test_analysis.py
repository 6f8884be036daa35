"""Analysis: the gallery, Grad-CAM on the same images, the 5x5 layer rule, confusion and per-class
accuracy, report files, and one-line errors through the CLI.

One tiny fastnet run (the session's, tests/train_fixtures.py) is copied and analysed once per module; every
test reads that analysis.
The layer-rule tests use random-init models (no training).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from beton.errors import UserError
from beton.manifest import read_manifest
from fastcifar_cli import main
from fastloader.loaders import read_split
from train.models import create_model
from train.run import RunDir

N = 8
PNG = b"\x89PNG\r\n\x1a\n"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt")


@pytest.fixture(scope="module")
def trained_run(tiny_run, tmp_path_factory):
    """A copy of the session's tiny run (fit(build_config(tiny(learnable_betons)))): the analysis writes into it."""
    return tiny_run.copy_to(tmp_path_factory.mktemp("analysis") / "run")


@pytest.fixture(scope="module")
def analysed(trained_run):
    from analysis.report import analyze

    lines: list[str] = []
    result = analyze(trained_run, n=N, log=lines.append)
    return result, lines


def copy_run(run, dest, files=RUN_FILES):
    dest.mkdir(parents=True)
    for name in files:
        shutil.copy(run / name, dest / name)
    return dest


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr()


# ---------------------------------------------------------------- gallery and Grad-CAM


def test_gallery_holds_only_misclassified_and_gradcam_the_same_images(analysed, trained_run):
    a, lines = analysed
    summary = json.loads((trained_run / "analysis.json").read_text())
    with np.load(trained_run / "predictions.npz") as data:
        logits, labels, indices = data["logits"], data["labels"], data["indices"]
    assert logits.dtype == np.float32 and logits.shape == (200, 10)
    assert np.array_equal(indices, np.arange(200))  # the whole test split, dataset order
    wrong = int((logits.argmax(1) != labels).sum())
    assert 0 < wrong < 200
    expected = min(N, wrong)
    assert len(summary["indices"]) == expected == summary["n_shown"] == len(a.cams)
    assert (summary["note"] is None) == (wrong >= N)
    position = {int(i): k for k, i in enumerate(indices)}
    for idx, t, p in zip(summary["indices"], summary["true"], summary["predicted"]):
        k = position[idx]
        assert labels[k] == t and logits[k].argmax() == p and t != p  # misclassified, as recorded
    # most-confident first
    assert summary["confidence"] == sorted(summary["confidence"], reverse=True)
    # the Grad-CAM grid covers the same indices in the same order
    assert summary["gradcam_indices"] == summary["indices"] == a.indices == a.gradcam_indices
    assert len(set(summary["indices"])) == expected
    assert summary["gradcam_layer"] == "layer2" and summary["gradcam_layer_size"] == [8, 8]  # fastnet


def test_gradcam_equals_a_direct_pytorch_grad_cam_call(analysed, trained_run, learnable_betons):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    a, _ = analysed
    summary = json.loads((trained_run / "analysis.json").read_text())
    model = create_model("fastnet", 10)
    model.load_state_dict(torch.load(trained_run / "checkpoint_best.pt", weights_only=True)["model"])
    model.eval()
    raw, _ = read_split(learnable_betons, "test")
    manifest = read_manifest(learnable_betons)
    images = raw[summary["indices"]].astype(np.float32)
    x = torch.from_numpy((images - np.float32(manifest["mean"])) / np.float32(manifest["std"])).permute(0, 3, 1, 2)
    with GradCAM(model=model, target_layers=[model.layer2]) as cam:
        direct = cam(input_tensor=x.contiguous(), targets=[ClassifierOutputTarget(c) for c in summary["predicted"]])
    assert direct.shape == a.cams.shape == (len(summary["indices"]), 32, 32)
    assert np.allclose(direct, a.cams, atol=1e-5)
    # hooks released: neither the CAM's model copy nor the run's model keeps any
    for net in (a.cam_model, a.loaded.model):
        assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())


def test_gradcam_runs_on_a_channels_last_model_in_fp32():
    from analysis.gradcam import cam_model, compute_cams

    torch.manual_seed(0)
    model = create_model("fastnet", 10).to(memory_format=torch.channels_last).eval()
    x = torch.randn(3, 3, 32, 32).to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    net = cam_model(model)
    cams = compute_cams(net, "layer2", x, [0, 1, 2], "gradcam++")
    assert cams.shape == (3, 32, 32) and cams.dtype == np.float32 and np.isfinite(cams).all()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())


# ---------------------------------------------------------------- confusion, per-class, files


def test_confusion_matrix_sums_to_the_test_count_and_agrees_with_per_class(analysed, trained_run):
    a, lines = analysed
    summary = json.loads((trained_run / "analysis.json").read_text())
    cm = np.array(summary["confusion_matrix"])
    assert cm.sum() == summary["test_count"] == 200
    with np.load(trained_run / "predictions.npz") as data:
        pred, labels = data["logits"].argmax(1), data["labels"]
    assert np.array_equal(cm.sum(1), np.bincount(labels, minlength=10))
    assert np.trace(cm) == summary["test_correct"] == int((pred == labels).sum())
    assert summary["test_accuracy"] == round(100 * np.trace(cm) / cm.sum(), 2)
    for i, name in enumerate(summary["classes"]):
        assert summary["per_class_accuracy"][name] == pytest.approx(100 * cm[i, i] / cm[i].sum(), abs=0.005)
    per_class = [line for line in lines if line.startswith("Accuracy of")]
    assert len(per_class) == 10
    for i, line in enumerate(per_class):
        m = re.fullmatch(r"Accuracy of +(\S+) : +(\d+) %", line)
        assert m and m.group(1) == summary["classes"][i] and int(m.group(2)) == 100 * cm[i, i] // cm[i].sum()
    off = cm - np.diag(np.diag(cm))
    counts = [p["count"] for p in summary["most_confused"]]
    assert counts == sorted(counts, reverse=True) and counts[0] == off.max()
    for p in summary["most_confused"]:
        i, j = summary["classes"].index(p["true"]), summary["classes"].index(p["predicted"])
        assert cm[i, j] == p["count"] and i != j


def test_files_and_report(analysed, trained_run):
    for name in ("curves.png", "misclassified.png", "gradcam.png", "confusion.png"):
        assert (trained_run / name).read_bytes()[:8] == PNG
    report = (trained_run / "report.md").read_text()
    for needle in ("# Analysis of run `tiny`", "![", "(curves.png)", "(misclassified.png)", "(gradcam.png)",
                   "(confusion.png)", "Accuracy of", "## Most confused pairs", "fastnet", "onecycle",
                   "Final metrics", "`layer2` (8x8"):
        assert needle in report, needle
    summary = json.loads((trained_run / "analysis.json").read_text())
    assert set(summary) >= {"indices", "true", "predicted", "gradcam_layer", "gradcam_layer_size",
                            "per_class_accuracy", "most_confused", "test_accuracy"}


def test_the_report_says_why_its_count_differs_from_the_loops(analysed, trained_run):
    """The prediction pass (BatchNorm folded, its own batch size) may count a few images otherwise than the loop's
    evaluation in bf16: the report says so, with the loop's count, and says nothing where they agree."""
    from analysis.report import _report_md

    result, _ = analysed
    metrics = RunDir(trained_run).metrics()
    epoch = result.loaded.epoch
    correct = int((result.predictions.predicted == result.predictions.labels).sum())
    same = [{**m, "test_correct": correct} if m["epoch"] == epoch else m for m in metrics]
    other = [{**m, "test_correct": correct - 1} if m["epoch"] == epoch else m for m in metrics]
    assert "The loop's evaluation" not in _report_md(result, same, "best", "most-confident", 0)
    text = _report_md(result, other, "best", "most-confident", 0)
    assert f"The loop's evaluation after epoch {epoch} counted {correct - 1:,}" in text
    assert "folds each BatchNorm into its convolution" in text


# ---------------------------------------------------------------- the 5x5 layer rule


@pytest.mark.parametrize("name, fields, expected, smaller", [
    ("resnet18", {}, "layer3", "layer4"),
    ("resnet34", {}, "layer3", "layer4"),
    ("custom_resnet", {}, "layer2", "layer3"),
    ("timm:resnet10t", {"adapt_stem": True}, "layer3", "layer4"),
])
def test_default_layer_is_the_deepest_at_least_5x5(name, fields, expected, smaller):
    from analysis.gradcam import MIN_SIZE, feature_map_sizes, resolve_layer

    model = create_model(name, 10, **fields).to(memory_format=torch.channels_last)
    layer, size = resolve_layer(model)
    assert (layer, size) == (expected, (8, 8))
    sizes = feature_map_sizes(model, [n for n, _ in model.named_children()])
    later = list(sizes)[list(sizes).index(layer) + 1:]
    assert later and all(min(sizes[n]) < MIN_SIZE for n in later)  # nothing after it is 5x5 or more
    with pytest.raises(UserError, match="smaller than 5x5"):
        resolve_layer(model, smaller)
    assert resolve_layer(model, smaller, allow_small=True) == (smaller, (4, 4))
    with pytest.raises(UserError, match="unknown layer 'layer9'"):
        resolve_layer(model, "layer9")


# ---------------------------------------------------------------- CLI: errors and notes


def test_cli_errors_are_one_line_with_exit_2(trained_run, tmp_path, capsys):
    no_checkpoint = copy_run(trained_run, tmp_path / "nockpt", files=("config.yaml",))
    cases = [
        ([no_checkpoint], "no checkpoint"),
        ([tmp_path / "missing"], "not found"),
        ([tmp_path], "not a run folder"),
        ([trained_run, "--layer", "layer9"], "unknown layer 'layer9'"),
        ([trained_run, "--layer", "layer3"], "smaller than 5x5"),
        ([trained_run, "--pick", "best"], "--pick"),
        ([trained_run, "--method", "magic"], "unknown Grad-CAM method"),
        ([trained_run, "--target", "other"], "--target"),
        ([trained_run, "--checkpoint", "middle"], "--checkpoint"),
    ]
    for args, message in cases:
        code, out = run_cli(["analyze", *args], capsys)
        assert code == 2, (args, out.err)
        err = out.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, out.err)
        assert "Traceback" not in out.err + out.out
    assert "layer1" in run_cli(["analyze", trained_run, "--layer", "layer9"], capsys)[1].err  # lists valid ones


def test_cli_more_than_misclassified_is_a_note_not_an_error(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "copy")
    code, out = run_cli(["analyze", run, "--n", "500", "--pick", "first", "--layer", "layer3",
                         "--allow-small-layer", "--method", "gradcam++", "--checkpoint", "last"], capsys)
    assert code == 0, out.err
    summary = json.loads((run / "analysis.json").read_text())
    wrong = summary["test_count"] - summary["test_correct"]
    assert summary["n_shown"] == len(summary["indices"]) == wrong < 500
    assert f"note: only {wrong} of 200 test images are misclassified" in out.out
    assert summary["indices"] == sorted(summary["indices"])  # --pick first: dataset order
    assert summary["gradcam_layer"] == "layer3" and summary["gradcam_layer_size"] == [4, 4]
    assert summary["gradcam_method"] == "gradcam++" and summary["checkpoint"] == "last"
    assert out.out.count("Accuracy of") == 10 and "wrote" in out.out and str(run) in out.out


class ReusingLoader:
    """Mimics FFCV: every batch is written into the same output tensors."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.buf_x = torch.empty_like(images[:4]).contiguous(memory_format=torch.channels_last)
        self.buf_y = torch.empty_like(labels[:4])
        self.buf_i = torch.empty(4, dtype=torch.int64)

    def batches(self):
        for s in range(0, len(self.labels), 4):
            self.buf_x.copy_(self.images[s:s + 4])
            self.buf_y.copy_(self.labels[s:s + 4])
            self.buf_i.copy_(torch.arange(s, s + 4))
            yield self.buf_x, self.buf_y, self.buf_i


def test_predictions_copy_reused_buffers_and_folding_keeps_the_logits():
    from analysis.predictions import predict
    from train.hardware import resolve_precision

    torch.manual_seed(0)
    model = create_model("fastnet", 10).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    images, labels = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    fp32, cpu = resolve_precision("fp32", torch.device("cpu")), torch.device("cpu")
    folded = predict(model, ReusingLoader(images, labels), fp32, cpu)
    plain = predict(model, ReusingLoader(images, labels), fp32, cpu, fold_batchnorm=False)
    with torch.no_grad():
        direct = model(images).numpy()
    assert np.array_equal(folded.indices, np.arange(12)) and np.array_equal(folded.labels, labels.numpy())
    assert np.allclose(plain.logits, direct, atol=1e-5) and np.allclose(folded.logits, direct, atol=1e-4)


# ---------------------------------------------------------------- report.md's Config table: what ran


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def saved_config(raw: dict, overrides=()):
    """What analysis reads: a config as the run's config.yaml holds it (resolved values), read back."""
    from train.config import build_config

    return build_config(yaml.safe_load(yaml.safe_dump(build_config(raw, list(overrides)).to_dict())))


def meta_model(cfg):
    with torch.device("meta"):
        return create_model(cfg.model, num_classes=10)


def test_report_lists_each_roles_optimizer_and_lr_not_the_unused_top_level_ones():
    from analysis.report import config_rows
    from train.config import load_raw

    raw = load_raw(CONFIGS / "speed94.yaml")
    raw["optimizer"]["roles"]["filters"] = {"name": "muon", "lr": 0.2}  # Muon's defaults ran: they show
    cfg = saved_config(raw, ["train.precision=bf16", "train.epochs=5"])  # what auto and a budget resolved to
    rows = dict(config_rows(cfg, meta_model(cfg)))
    assert [k for k in rows if k.startswith("optimizer")] == [
        "optimizer: filters", "optimizer: norm_biases", "optimizer: whitening_bias", "optimizer: head"]
    assert rows["optimizer: filters"] == "muon, lr 0.2, momentum 0.95, nesterov, 5 Newton-Schulz steps"
    assert rows["optimizer: norm_biases"] == "sgd, lr 106, momentum 0.85, nesterov, weight decay 3.77e-05"
    assert rows["optimizer: head"] == "sgd, lr 1340, momentum 0.85, nesterov, weight decay 2.985e-06"
    assert not any("lr 0.05" in v or "0.0005" in v for v in rows.values())  # the top-level defaults no role used
    assert rows["scheduler"] == ("linear per batch: warm-up 0 epochs, then down to 0 at the last step; "
                                 "whitening_bias over its first 3 epochs")
    assert rows["training"].startswith("5 epochs, precision bf16, label smoothing 0.2, seed 0")
    assert rows["evaluation"] == ("test-time augmentation flip_translate (shift 1), on the 25% least confident images "
                                  "of each batch, last epoch and this analysis only")


def test_report_says_what_onecycle_set_and_which_images_trained():
    """max_lr and start_lr as the range test resolved them (config.yaml holds the numbers); onecycle sets every
    LR and cycles the momentum, so the optimizer row gives neither as a number; the validation split's images
    are not trained on."""
    from analysis.report import config_rows

    from .train_fixtures import tiny

    raw = tiny("/nowhere")
    raw["data"].update(subset=900, val_split=100)
    raw["scheduler"].update(max_lr=0.0123, start_lr=0.00041, peak_epoch=1)
    raw["optimizer"].update(weight_decay=5e-4, no_decay_norm_bias=True)
    cfg = saved_config(raw)
    rows = dict(config_rows(cfg, meta_model(cfg)))
    assert rows["optimizer"] == ("sgd, LR from the schedule, momentum from the schedule, nesterov, weight decay 0.0005 "
                                 "(none on norm weights and biases)")
    assert rows["scheduler"].startswith("onecycle per batch (max_lr 0.0123 for every parameter group, start_lr 0.00041, "
                                        "peak epoch 1, final div 10000, cos annealing, momentum cycled")
    assert rows["data"] == "cifar10, batch 100, first 900 train images, 100 of them held out for validation"
    assert rows["evaluation"] == "no test-time augmentation"
