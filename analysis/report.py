"""`analyze(run_dir)`: everything `fastcifar analyze` writes into a run folder.

predictions.npz  logits (float32 N x K), labels, dataset indices of the whole test split
curves.png       train/test loss, train/test accuracy, LR schedule
misclassified.png  N misclassified test images, "true / predicted (confidence%)"
gradcam.png      Grad-CAM overlays on the same N images, same order
confusion.png    confusion matrix, counts and row-normalised
analysis.json    picks (indices, true, predicted), Grad-CAM layer and size, per-class accuracy,
                 most-confused pairs, test accuracy
report.md        all of it with the run's config and final metrics, readable on GitHub

The cheap checks (run folder, checkpoint, options, Grad-CAM layer) come before the prediction
pass, so a mistake fails in a second, not after a pass over the test split.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from beton.atomic import atomic_write_text
from beton.errors import UserError
from fastloader.loaders import read_split
from train.models import count_parameters

from . import confusion, curves, gradcam, plots
from .gallery import check_pick, pick_misclassified, plot_gallery, titles
from .predictions import LoadedRun, Predictions, load_run, predict, test_loader

TARGETS = ("predicted", "true")
FILES = {"predictions": "predictions.npz", "curves": "curves.png", "misclassified": "misclassified.png",
         "gradcam": "gradcam.png", "confusion": "confusion.png", "analysis": "analysis.json", "report": "report.md"}


@dataclass
class Analysis:
    """What `analyze` computed (the files hold the same)."""

    loaded: LoadedRun
    predictions: Predictions
    positions: np.ndarray  # gallery picks as positions into `predictions`
    indices: list  # their test-set indices, in gallery order (misclassified.png)
    gradcam_indices: list  # the test-set indices of gradcam.png's cells, in order
    true: list
    predicted: list
    confidence: list
    layer: str
    layer_size: tuple
    method: str
    target: str
    cams: np.ndarray  # N x 32 x 32 in [0, 1], gallery order
    cam_inputs: torch.Tensor  # the normalised float32 images the CAMs were computed on
    cam_model: torch.nn.Module  # the float32 copy the CAMs ran on (its hooks released)
    matrix: np.ndarray
    per_class: dict
    most_confused: list
    note: str | None
    files: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 N x H x W x 3 RGB -> float32 N x 3 x H x W, normalised as the test loader does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()


def analyze(run_dir: str | Path, checkpoint: str = "best", n: int = 20, pick: str = "most-confident",
            seed: int = 0, layer: str | None = None, allow_small_layer: bool = False, method: str = "gradcam",
            target: str = "predicted", log: Callable[[str], None] = print) -> Analysis:
    """Analyse the run in `run_dir` (see the module docstring for the files); returns the results."""
    start = time.perf_counter()
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    gradcam.method_class(method)  # unknown method: fail now
    check_pick(pick)
    loaded = load_run(run_dir, checkpoint)
    layer_name, layer_size = gradcam.resolve_layer(loaded.model, layer, allow_small_layer)
    out = loaded.run.path
    files = {key: out / name for key, name in FILES.items()}
    seconds = {}

    t = time.perf_counter()
    loader = test_loader(loaded.cfg, loaded.device, loaded.precision.batch_dtype)
    preds = predict(loaded.model, loader, loaded.precision, loaded.device, eval_cfg=loaded.cfg.eval)
    seconds["predictions"] = time.perf_counter() - t
    preds.save(files["predictions"])

    positions, note = pick_misclassified(preds, n, pick, seed)
    indices = preds.indices[positions]
    true, predicted = preds.labels[positions], preds.predicted[positions]
    confidence = preds.confidence[positions]
    raw, raw_labels = read_split(loaded.folder, "test", workers=loaded.cfg.data.num_workers())
    if len(indices) and (indices.max() >= len(raw) or not np.array_equal(raw_labels[indices], true)):
        raise UserError(f"the test beton in {loaded.folder} does not match the loader's labels; rewrite it")
    images = raw[indices]

    t = time.perf_counter()
    cam_inputs = normalise(images, loaded.mean, loaded.std)
    cam_net = gradcam.cam_model(loaded.model)
    cam_targets = predicted if target == "predicted" else true
    cams = gradcam.compute_cams(cam_net, layer_name, cam_inputs, cam_targets, method)
    seconds["gradcam"] = time.perf_counter() - t

    k = len(loaded.classes)
    matrix = confusion.confusion_matrix(preds.labels, preds.predicted, k)
    per_class = confusion.per_class_accuracy(matrix, loaded.classes)
    pairs = confusion.most_confused(matrix, loaded.classes)

    cell_titles = titles(loaded.classes, true, predicted, confidence)
    name = loaded.cfg.name
    picked = f"{len(indices)} misclassified test images ({pick}{f', seed {seed}' if pick == 'random' else ''})"
    plot_gallery(images, cell_titles, files["misclassified"], f"{name}: {picked}\ntrue / predicted (confidence)")
    factor = plots.UPSCALE
    overlay = gradcam.overlays(plots.upscale(images, factor), gradcam.upscale_cams(cams, factor))
    fig = plots.image_grid(overlay, cell_titles,
                           f"{name}: {method} at {layer_name} ({layer_size[0]}x{layer_size[1]}), "
                           f"target: {target} class\nsame images and order as misclassified.png",
                           empty_text="no misclassified test images", factor=1)
    plots.save(fig, files["gradcam"])
    metrics = loaded.run.metrics() or loaded.history
    trace = curves.replay_lr(loaded.cfg, metrics, curves.steps_per_epoch(loaded.cfg, _train_count(loaded)))
    curves.plot_curves(metrics, files["curves"], trace, title=f"{name}: {loaded.cfg.model.name}")
    confusion.plot_confusion(matrix, loaded.classes, files["confusion"],
                             title=f"{name}: test accuracy {preds.accuracy:.2f}% ({checkpoint} checkpoint)")

    result = Analysis(loaded, preds, positions, [int(i) for i in indices], [int(i) for i in indices],
                      [int(c) for c in true], [int(c) for c in predicted], [round(float(c), 6) for c in confidence],
                      layer_name, tuple(layer_size), method, target, cams, cam_inputs, cam_net, matrix, per_class,
                      pairs, note, files, seconds)
    seconds["total"] = time.perf_counter() - start
    atomic_write_text(files["analysis"], json.dumps(_summary(result, n, pick, seed, checkpoint), indent=1) + "\n")
    atomic_write_text(files["report"], _report_md(result, metrics, checkpoint, pick, seed))

    for line in confusion.per_class_lines(matrix, loaded.classes):
        log(line)
    if pairs:
        log("most confused: " + ", ".join(f"{q['true']} -> {q['predicted']} ({q['count']})" for q in pairs))
    if note:
        log(note)
    log(f"test accuracy {preds.accuracy:.2f}% ({int((preds.predicted == preds.labels).sum()):,}/{len(preds.labels):,}); "
        f"predictions {seconds['predictions']:.1f} s, Grad-CAM ({len(indices)} images, {layer_name} "
        f"{layer_size[0]}x{layer_size[1]}) {seconds['gradcam']:.1f} s, total {seconds['total']:.1f} s")
    log(f"wrote {', '.join(FILES.values())} to {out}")
    return result


def _train_count(loaded: LoadedRun) -> int:
    from beton.manifest import read_manifest

    return int(read_manifest(loaded.folder)["splits"]["train"]["count"])


def _summary(a: Analysis, n: int, pick: str, seed: int, checkpoint: str) -> dict:
    classes = a.loaded.classes
    p = a.predictions
    return {
        "run": str(a.loaded.run.path),
        "checkpoint": checkpoint,
        "checkpoint_epoch": a.loaded.epoch,
        "test_count": int(len(p.labels)),
        "test_correct": int((p.predicted == p.labels).sum()),
        "test_accuracy": round(p.accuracy, 2),
        "n_requested": n,
        "n_shown": len(a.indices),
        "pick": pick,
        "seed": seed,
        "note": a.note,
        "indices": a.indices,
        "true": a.true,
        "predicted": a.predicted,
        "true_names": [classes[c] for c in a.true],
        "predicted_names": [classes[c] for c in a.predicted],
        "confidence": a.confidence,
        "gradcam_method": a.method,
        "gradcam_target": a.target,
        "gradcam_layer": a.layer,
        "gradcam_layer_size": list(a.layer_size),
        "gradcam_indices": a.gradcam_indices,
        "per_class_accuracy": a.per_class,
        "most_confused": a.most_confused,
        "confusion_matrix": a.matrix.tolist(),
        "classes": classes,
        "files": {k: v.name for k, v in a.files.items()},
        "seconds": {k: round(v, 2) for k, v in a.seconds.items()},
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _fmt_aug(entry) -> str:
    if isinstance(entry, dict):
        name, params = next(iter(entry.items()))
        if not isinstance(params, dict):
            return name if params is None else f"{name} ({_fmt(params)})"
        inner = ", ".join(f"{k} {_fmt(v)}" for k, v in params.items())
        return f"{name} ({inner})" if inner else name
    return str(entry)


def _report_md(a: Analysis, metrics: list[dict], checkpoint: str, pick: str, seed: int) -> str:
    cfg = a.loaded.cfg
    p = a.predictions
    classes = a.loaded.classes
    lines = [f"# Analysis of run `{cfg.name}`", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [f"Checkpoint: `{a.loaded.checkpoint.name}` ({checkpoint}, after epoch {a.loaded.epoch} of "
              f"{cfg.train.epochs}); analysed {stamp} by `fastcifar analyze`.", ""]

    sched = cfg.scheduler
    sched_text = sched.name
    if sched.name == "onecycle":
        peak = f"peak epoch {sched.peak_epoch:g}" if sched.peak_epoch is not None else f"pct_start {sched.pct_start:g}"
        max_lr = sched.max_lr if sched.max_lr is not None else cfg.optimizer.lr
        sched_text += f" (max_lr {_fmt(max_lr)}, {peak}, div {sched.div_factor:g}, final div {sched.final_div_factor:g})"
    elif sched.name == "step":
        sched_text += f" (step {sched.step_size}, gamma {sched.gamma:g})"
    elif sched.name == "plateau":
        sched_text += f" (factor {sched.factor:g}, patience {sched.patience}, min_lr {sched.min_lr:g})"
    opt = cfg.optimizer
    opt_text = f"{opt.name}, lr {opt.lr:g}, weight decay {opt.weight_decay:g}"
    if opt.name == "sgd":
        opt_text += f", momentum {opt.momentum:g}{', nesterov' if opt.nesterov else ''}"
    rows = [("model", f"{cfg.model.name} ({cfg.model.norm} norm), {count_parameters(a.loaded.model):,} parameters"),
            ("data", f"{cfg.data.dataset}, batch {cfg.data.batch_size}"
                     f"{f', first {cfg.data.subset:,} train images' if cfg.data.subset else ''}"),
            ("augmentation", ", ".join(_fmt_aug(e) for e in cfg.data.augment) or "none"),
            ("optimizer", opt_text),
            ("scheduler", sched_text),
            ("training", f"{cfg.train.epochs} epochs, precision {cfg.train.precision}, "
                         f"label smoothing {cfg.train.label_smoothing:g}, seed {cfg.train.seed}")]
    lines += ["## Config", "", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]

    lines += ["## Final metrics", ""]
    if metrics:
        last = metrics[-1]
        chosen = f"{getattr(cfg.train, 'select_best_on', 'test')}_acc"
        best = max(metrics, key=lambda m: m.get(chosen, m["test_acc"]))
        val = "val_acc" in last
        lines += ["| | epoch | train loss | train acc | test loss | test acc |" + (" val loss | val acc |" if val else ""),
                  "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if val else "")]
        for label, m in (("last", last), (f"best ({chosen.replace('_acc', '')} accuracy)", best)):
            lines.append(f"| {label} | {m['epoch']} | {m['train_loss']:.4f} | {m['train_acc']:.2f}% | "
                         f"{m['test_loss']:.4f} | {m['test_acc']:.2f}% |" +
                         (f" {m['val_loss']:.4f} | {m['val_acc']:.2f}% |" if val else ""))
        lines.append("")
    correct = int((p.predicted == p.labels).sum())
    lines += [f"This analysis ({checkpoint} checkpoint): test accuracy **{p.accuracy:.2f}%** "
              f"({correct:,}/{len(p.labels):,}).", "",
              "## Training curves", "", "![loss, accuracy and learning rate per epoch](curves.png)", ""]

    lines += ["## Misclassified test images", "",
              f"{len(a.indices)} misclassified test images, picked {pick}"
              f"{f' (seed {seed})' if pick == 'random' else ''}; titles are true / predicted (confidence).", ""]
    if a.note:
        lines += [f"> {a.note}", ""]
    lines += ["![misclassified test images](misclassified.png)", ""]
    if a.indices:
        lines += ["| # | test index | true | predicted | confidence |", "| ---: | ---: | --- | --- | ---: |"]
        lines += [f"| {i + 1} | {idx} | {classes[t]} | {classes[pr]} | {100 * c:.1f}% |"
                  for i, (idx, t, pr, c) in enumerate(zip(a.indices, a.true, a.predicted, a.confidence))]
        lines.append("")

    lines += ["## Grad-CAM", "",
              f"{a.method} at layer `{a.layer}` ({a.layer_size[0]}x{a.layer_size[1]} feature map), for the "
              f"{a.target} class, on the same images in the same order.", "",
              "![Grad-CAM overlays](gradcam.png)", ""]

    lines += ["## Confusion matrix", "", "![confusion matrix: counts and row-normalised](confusion.png)", "",
              "## Per-class accuracy", "", "```text"] + confusion.per_class_lines(a.matrix, classes) + ["```", ""]
    lines += ["## Most confused pairs", ""]
    if a.most_confused:
        lines += ["| true | predicted as | count | % of true class |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {q['true']} | {q['predicted']} | {q['count']} | {q['percent_of_true']:.2f}% |"
                  for q in a.most_confused]
    else:
        lines.append("No test image is misclassified.")
    lines += ["", "Files: " + ", ".join(f"`{name}`" for name in FILES.values()) + "."]
    return "\n".join(lines) + "\n"
