"""A run's model on its test split: loading the run, one prediction pass, predictions.npz.

The prediction pass reads the test split once, in dataset order, keeping each batch's
dataset indices (FFCV reuses its buffers, so labels and indices are copied per batch).
For speed the pass runs on an inference copy of the model with every BatchNorm folded
into the conv before it (where torch.fx can trace the model) under the run's autocast
precision; the logits are returned as float32.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from beton.atomic import atomic_write_bytes
from beton.errors import UserError
from beton.manifest import read_manifest
from fastloader.loaders import build_loader
from fastloader.threads import cpu_cores
from train import checkpoint as ckpt
from train.tta import eval_logits
from train.config import ExperimentConfig, build_config
from train.hardware import Precision, resolve_device, resolve_precision
from train.models import create_model
from train.run import RunDir

CHECKPOINTS = ("best", "last")
CPU_BATCH = 250  # test batch of the prediction pass on the CPU (see test_loader)
GPU_BATCH = 1000


@dataclass
class Predictions:
    """Logits of the test split in dataset order: logits float32 N x K, labels and indices int64 N."""

    logits: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)

    @property
    def probabilities(self) -> np.ndarray:
        z = self.logits - self.logits.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    @property
    def confidence(self) -> np.ndarray:
        """Softmax probability of the predicted class."""
        return self.probabilities.max(1)

    @property
    def accuracy(self) -> float:
        return 100.0 * float((self.predicted == self.labels).mean()) if len(self.labels) else 0.0

    def save(self, path: str | Path) -> Path:
        buffer = io.BytesIO()
        np.savez(buffer, logits=self.logits.astype(np.float32), labels=self.labels.astype(np.int64),
                 indices=self.indices.astype(np.int64))
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Predictions":
        with np.load(path) as data:
            return cls(data["logits"], data["labels"], data["indices"])


@dataclass
class LoadedRun:
    """A run folder with its config and the chosen checkpoint's weights in a model."""

    run: RunDir
    cfg: ExperimentConfig
    checkpoint: Path
    epoch: int
    history: list
    model: torch.nn.Module  # float32, eval mode, on `device`, channels_last as trained
    device: torch.device
    precision: Precision
    classes: list
    mean: list  # manifest's per-channel mean/std, 0-255 scale, RGB
    std: list
    folder: Path  # the beton folder


def _device_and_precision(cfg: ExperimentConfig) -> tuple[torch.device, Precision]:
    """The run's device and precision where this machine has them, else the CPU and `auto`."""
    try:
        device = resolve_device(cfg.train.device)
    except UserError:
        device = torch.device("cpu")
    try:
        precision = resolve_precision(cfg.train.precision, device)
    except UserError:  # fp16 on a CPU: analyse in bf16
        precision = resolve_precision("auto", device)
    return device, precision


def load_run(run_dir: str | Path, which: str = "best") -> LoadedRun:
    """Read `run_dir`'s config and its `which` checkpoint ("best" or "last") into a model."""
    if which not in CHECKPOINTS:
        raise UserError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"run folder not found: {run.path}")
    raw = run.config()  # UserError without config.yaml
    cfg = build_config(raw, where=f"{run.path / 'config.yaml'}")
    path = run.best if which == "best" else run.last
    if not path.is_file():
        raise UserError(f"{run.path} has no checkpoint ({path.name}); train it first: "
                        f"fastcifar train --resume {run.path}")
    state = ckpt.load(path, map_location="cpu")
    manifest = read_manifest(cfg.data.folder())
    classes = list(manifest["classes"])
    model = create_model(cfg.model, num_classes=len(classes), pretrained=False)
    try:
        model.load_state_dict(state["ema"]["average"] if state.get("ema") else state["model"])  # what evaluation ran
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not fit the run's model {cfg.model.name}: "
                        f"{str(e).strip().splitlines()[0]}") from e
    device, precision = _device_and_precision(cfg)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).eval()
    return LoadedRun(run=run, cfg=cfg, checkpoint=path, epoch=int(state.get("epoch", 0)),
                     history=list(state.get("history", [])), model=model, device=device, precision=precision,
                     classes=classes, mean=list(manifest["mean"]), std=list(manifest["std"]),
                     folder=Path(cfg.data.folder()))


def test_loader(cfg: ExperimentConfig, device: torch.device, dtype: torch.dtype):
    """The run's test loader (sequential, dataset order) for the prediction pass.

    On the CPU: batches of CPU_BATCH and one loader worker per core. FFCV sets torch's thread
    count to its worker count (from the loader's own thread too), so fewer workers would leave
    the model single-threaded; and batches of a few hundred images keep each activation small
    enough for the allocator to reuse instead of mapping fresh pages every batch (faster than
    1000 by about a fifth on 2 cores). On a GPU: batches of at least GPU_BATCH.
    """
    if device.type == "cpu":
        data = dataclasses.replace(cfg.data, test_batch_size=CPU_BATCH, workers=cpu_cores())
    else:
        batch = max(cfg.data.test_batch_size or cfg.data.batch_size, GPU_BATCH)
        data = dataclasses.replace(cfg.data, test_batch_size=batch)
    return build_loader(data, "test", device, dtype, shard=False)  # the whole split, even on rank 0 of torchrun


def inference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval copy of `model` with BatchNorms folded into their convs (same outputs, fewer passes
    over memory); the plain copy where torch.fx cannot trace the model."""
    model = copy.deepcopy(model).eval()
    try:
        from torch.fx.experimental.optimization import fuse

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(model, inplace=True)
    except Exception:  # not symbolically traceable (some timm models): unfused is only slower
        return model


@torch.no_grad()
def predict(model: torch.nn.Module, loader, precision: Precision, device: torch.device,
            fold_batchnorm: bool = True, eval_cfg=None) -> Predictions:
    """Logits of every sample `loader` yields (one pass), with labels and dataset indices; with
    `eval_cfg` (the run's `eval:` section) the logits are the test-time-augmented ones training reported.

    The loader gives torch one thread per core (FFCV would leave it at its worker count).
    """
    net = inference_copy(model) if fold_batchnorm else model.eval()
    logits, labels, indices = [], [], []
    for images, y, idx in loader.batches():
        with precision.autocast(device):
            out = eval_logits(net, images, eval_cfg)
        logits.append(out.float().cpu())  # a new tensor: not one of FFCV's buffers
        labels.append(y.to("cpu", copy=True))
        indices.append(idx.clone())
    if not logits:
        raise UserError("the test split is empty: nothing to analyse")
    return Predictions(torch.cat(logits).numpy().astype(np.float32, copy=False),
                       torch.cat(labels).numpy().astype(np.int64), torch.cat(indices).numpy().astype(np.int64))
