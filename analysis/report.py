"""`analyze(run_dir)`: everything `fastcifar analyze` writes into a run folder.

predictions.npz  logits (float32 N x K), labels, dataset indices of the whole test split
curves.png       train/test loss, train/test accuracy, the LR of every step (per parameter role)
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
from train.budget import budget_use
from train.config import ExperimentConfig
from train.models import count_parameters

from . import confusion, curves, gradcam, plots, schedule
from .gallery import check_pick, pick_misclassified, plot_gallery, titles
from .predictions import CPU_BATCH, LoadedRun, Predictions, load_run, predict, test_loader

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
    count = schedule.train_count(loaded.cfg)
    trace = schedule.replay_lr(loaded.cfg, metrics, count and schedule.steps_per_epoch(loaded.cfg, count), loaded.model)
    curves.plot_curves(metrics, files["curves"], trace, title=f"{name}: {loaded.cfg.model.name}",
                       best_on=loaded.cfg.train.select_best_on)
    confusion.plot_confusion(matrix, loaded.classes, files["confusion"],
                             title=f"{name}: test accuracy {preds.accuracy:.2f}% ({checkpoint} checkpoint)")

    result = Analysis(loaded=loaded, predictions=preds, positions=positions, indices=[int(i) for i in indices],
                      gradcam_indices=[int(i) for i in indices], true=[int(c) for c in true],
                      predicted=[int(c) for c in predicted], confidence=[round(float(c), 6) for c in confidence],
                      layer=layer_name, layer_size=tuple(layer_size), method=method, target=target, cams=cams,
                      cam_inputs=cam_inputs, cam_model=cam_net, matrix=matrix, per_class=per_class,
                      most_confused=pairs, note=note, files=files, seconds=seconds)
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


def _optimizer_text(name: str, group: dict, onecycle=None) -> str:
    """One optimizer's settings as built (`group`: its param group, or the config section). `onecycle`: the
    scheduler section where onecycle sets the LR (and, cycling momentum, the momentum or Adam's beta1)."""
    cycled = onecycle is not None and onecycle.cycle_momentum
    parts = [name, "LR from the schedule" if onecycle is not None else f"lr {_fmt(group['lr'])}"]
    if name in ("sgd", "muon") and group.get("momentum"):
        parts.append("momentum from the schedule" if cycled else f"momentum {_fmt(group['momentum'])}")
        parts += ["nesterov"] if group.get("nesterov") else []
    if name in ("adam", "adamw"):
        betas = (f"beta1 from the schedule, beta2 {_fmt(group['betas'][1])}" if cycled
                 else f"betas {_fmt(list(group['betas']))}")
        parts.append(f"{betas}, eps {_fmt(group['eps'])}")
    if group.get("weight_decay"):
        parts.append(f"weight decay {_fmt(group['weight_decay'])}")
    if name == "muon":
        parts.append(f"{group['ns_steps']} Newton-Schulz steps")
        parts += ["filters renormalised"] if group.get("renormalize") else []
    return ", ".join(parts)


def optimizer_rows(cfg: ExperimentConfig, model=None) -> list[tuple[str, str]]:
    """The report's optimizer row(s). With `optimizer.name: roles`, one per parameter role the model has, read
    from the optimizer training builds (so a role's defaults show too; the top-level lr and weight decay, which
    no role uses, do not)."""
    opt = cfg.optimizer
    onecycle = cfg.scheduler if cfg.scheduler.name == "onecycle" else None
    if opt.name != "roles":
        text = _optimizer_text(opt.name, vars(opt), onecycle)
        if opt.no_decay_norm_bias and opt.weight_decay:
            text += " (none on norm weights and biases)"
        return [("optimizer", text)]
    built = schedule.stand_in_optimizer(cfg, model)
    return [(f"optimizer: {group['role']}", _optimizer_text(opt.roles[group["role"]]["name"], group, onecycle))
            for group in built.param_groups]


def scheduler_text(cfg: ExperimentConfig) -> str:
    """The scheduler row, with the values config.yaml holds resolved (max_lr found by the range test is a number)."""
    sched = cfg.scheduler
    if sched.name == "onecycle":
        max_lr = sched.max_lr if sched.max_lr is not None else cfg.optimizer.lr
        start = f"start_lr {_fmt(sched.start_lr)}" if sched.start_lr is not None else f"div {_fmt(sched.div_factor)}"
        peak = (f"peak epoch {_fmt(sched.peak_epoch)}" if sched.peak_epoch is not None
                else f"pct_start {_fmt(sched.pct_start)}")
        return (f"onecycle per batch (max_lr {_fmt(max_lr)} for every parameter group, {start}, {peak}, "
                f"final div {_fmt(sched.final_div_factor)}, {sched.anneal_strategy} annealing"
                f"{', three phases' if sched.three_phase else ''}"
                f"{', momentum cycled 0.95 -> 0.85 -> 0.95' if sched.cycle_momentum else ''})")
    if sched.name == "step":
        return f"step per epoch (x {_fmt(sched.gamma)} every {sched.step_size} epochs)"
    if sched.name == "plateau":
        return (f"plateau on {sched.monitor} ({sched.mode}; x {_fmt(sched.factor)} after {sched.patience} epochs "
                f"without a relative improvement of {_fmt(sched.threshold)}, min_lr {_fmt(sched.min_lr)})")
    if sched.name == "cosine":
        return f"cosine per batch over the run, from each LR to {_fmt(sched.eta_min)}"
    if sched.name == "linear":
        end = "0" if sched.end_factor == 0 else f"{_fmt(sched.end_factor)} x each group's LR"
        text = f"linear per batch: warm-up {_fmt(sched.warmup_epochs)} epochs, then down to {end} at the last step"
        if sched.role_epochs:
            text += "; " + ", ".join(f"{role} over its first {_fmt(e)} epochs" for role, e in sched.role_epochs.items())
        return text
    return f"{sched.name} (constant LR)" if sched.name == "none" else sched.name


def config_rows(cfg: ExperimentConfig, model: torch.nn.Module) -> list[tuple[str, str]]:
    """The report's Config table: what the run used, from its saved config.yaml (resolved values) and `model`."""
    data, train, ev = cfg.data, cfg.train, cfg.eval
    images = []
    if data.subset:
        images.append(f"first {data.subset:,} train images")
    if data.val_split:
        images.append(f"{data.val_split:,} of them held out for validation")
    if data.test_subset:
        images.append(f"first {data.test_subset:,} test images")
    training = [f"{train.epochs} epochs", f"precision {train.precision}",
                f"label smoothing {_fmt(train.label_smoothing)}", f"seed {train.seed}"]
    if train.grad_clip_value is not None:
        training.append(f"each gradient element clipped to +-{_fmt(train.grad_clip_value)}")
    if train.grad_clip is not None:
        training.append(f"gradient norm clipped to {_fmt(train.grad_clip)}")
    if train.whitening_bias_epochs is not None:
        training.append(f"whitening bias trained for the first {train.whitening_bias_epochs} epochs")
    if train.ema_decay is not None:
        training.append(f"evaluated on an EMA of the weights (decay {_fmt(train.ema_decay)} "
                        f"every {train.ema_every} steps)")
    if ev.tta == "none":
        evaluation = "no test-time augmentation"
    else:
        shift = f" (shift {ev.tta_shift})" if ev.tta == "flip_translate" else ""
        parts = [f"test-time augmentation {ev.tta}{shift}"]
        if ev.tta_fraction < 1:
            parts.append(f"on the {_fmt(100 * ev.tta_fraction)}% least confident images of each batch")
        if ev.tta_last_only:
            parts.append("last epoch and this analysis only")
        evaluation = ", ".join(parts)
    return ([("model", f"{cfg.model.name} ({cfg.model.norm} norm), {count_parameters(model):,} parameters"),
             ("data", ", ".join([f"{data.dataset}, batch {data.batch_size}"] + images)),
             ("augmentation", ", ".join(_fmt_aug(e) for e in data.augment) or "none")]
            + optimizer_rows(cfg, model)
            + [("scheduler", scheduler_text(cfg)), ("training", ", ".join(training)), ("evaluation", evaluation)])


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

    rows = config_rows(cfg, a.loaded.model)
    timing = a.loaded.run.timing()
    if cfg.train.budget_plan is not None and timing:  # train.budget: its plan beside what the epochs took
        plan = cfg.train.budget_plan
        corrected = f", {cfg.train.epochs} after epoch {plan.corrected_at_epoch}" if plan.corrected_at_epoch else ""
        rows.append(("time budget", f"{plan.seconds:g} s, {plan.epochs} epochs planned (at most {plan.max_epochs})"
                                    f"{corrected}: {budget_use(plan, timing)}"))
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
    epoch_line = next((m for m in metrics or [] if m["epoch"] == a.loaded.epoch), None)
    differs = ""
    if epoch_line is not None and epoch_line.get("test_count") == len(p.labels) \
            and epoch_line.get("test_correct") != correct:
        differs = (f" The loop's evaluation after epoch {a.loaded.epoch} counted {epoch_line['test_correct']:,}: "
                   f"this pass folds each BatchNorm into its convolution and takes its own batch size ({CPU_BATCH} "
                   f"on the CPU), and in {cfg.train.precision} a few images near a decision boundary can go the "
                   f"other way.")
    lines += [f"This analysis ({checkpoint} checkpoint): test accuracy **{p.accuracy:.2f}%** "
              f"({correct:,}/{len(p.labels):,}).{differs}", "",
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
