#!/usr/bin/env python3
"""The GPU check: every CUDA-only path of fastcifar once, cheapest and most telling first, then full runs with
the time left (docs/gpu.md, "Running the GPU check").

Each stage prints one line, PASS, FAIL <reason> or SKIP <reason>, and the JSON result (`--out DIR`:
DIR/gpu_check.json) is rewritten after every stage, and before each one with the stage it is in, so a
run killed at its time limit keeps what it did and names where it stopped. A failing stage does not stop
the next ones, except the environment and the betons, which every later stage needs.

Stages go through fastcifar's own code (fastloader.loaders.build_loader, train.parts.build,
train.state.start_training, train.step.train_step, train.loop.fit, train.speedrun.one_run, train.checkpoint,
analysis.report.analyze): this is a check of them, not a second implementation.

`--device cpu` is the dry run: every stage on the CPU with tiny sizes, the CUDA-only ones reported as
SKIP. `--cifar PATH` reads a cifar-10-batches-py folder, its tarball, or the compact `.npz` that `--pack`
writes (a subset small enough to travel to the GPU machine); `--synthetic` makes images instead.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from beton.errors import UserError  # noqa: E402
from beton.sources import Source, Split, read_source  # noqa: E402

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
AIRBENCH94_MUON_A100_SECONDS = 2.59  # airbench94_muon's published time on one A100 (../shared/seeds.md)
RESULT = "gpu_check.json"


class Skip(Exception):
    """A stage that cannot run here (the reason is its message)."""


class StageTimeout(BaseException):
    """A stage ran past its limit; not an Exception, so that no `except Exception` on the way turns it into another error."""


# ---------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each stage does: `GPU` on CUDA, `DRY` for the CPU dry run."""

    compare_images: int  # loader comparisons: training images (one epoch of each path)
    compare_batch: int
    steps: int  # precision stage: training steps per precision
    step_images: int
    short_images: int  # fit / resume / analysis / DDP / compile: training images
    short_test: int
    short_batch: int
    long_overrides: tuple  # extra overrides for the full runs (none on CUDA: the configs as shipped)
    speed_seeds: int
    stage_timeout: float
    estimate: bool  # time a few steps before each full run and skip it where it would not fit the time left


GPU = Sizes(compare_images=4096, compare_batch=512, steps=6, step_images=12000, short_images=10000,
            short_test=2000, short_batch=500, long_overrides=(), speed_seeds=5, stage_timeout=150.0,
            estimate=True)
DRY = Sizes(compare_images=64, compare_batch=16, steps=2, step_images=32, short_images=64, short_test=32,
            short_batch=16, long_overrides=("data.subset=32", "data.test_subset=16", "data.batch_size=16",
                                            "train.epochs=1"),
            speed_seeds=1, stage_timeout=600.0, estimate=False)


# ---------------------------------------------------------------- the data


def synthetic_source(train: int, test: int, seed: int = 0) -> Source:
    """Noise images whose class sets a colour and a stripe, so that a few steps already learn something."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", train), ("test", test)):
        labels = rng.integers(0, 10, n).astype(np.int64)
        images = rng.integers(0, 96, (n, 32, 32, 3), dtype=np.uint8)
        tint = (np.stack([labels * 15, 150 - labels * 10, (labels * 37) % 160], axis=1)).astype(np.uint8)
        images = images + tint[:, None, None, :]
        rows = (labels * 3) % 32
        images[np.arange(n), rows] = 255
        splits[split] = Split(np.ascontiguousarray(images), labels)
    return Source("cifar10", list(CIFAR10_CLASSES), splits, "synthetic (scripts/gpu_check.py)")


def read_compact(path: Path) -> Source:
    """The `.npz` that `--pack` writes: train_images, train_labels, test_images, test_labels, classes."""
    try:
        with np.load(path, allow_pickle=False) as z:
            splits = {s: Split(np.ascontiguousarray(z[f"{s}_images"]), z[f"{s}_labels"].astype(np.int64))
                      for s in ("train", "test")}
            classes = [str(c) for c in z["classes"]]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a compact CIFAR file written by --pack ({e})") from e
    for s, split in splits.items():
        if split.images.dtype != np.uint8 or split.images.shape[1:] != (32, 32, 3) or len(split.images) != len(split.labels):
            raise UserError(f"{path}: {s} images must be uint8 N x 32 x 32 x 3 with one label each")
    return Source("cifar10", classes, splits, str(path.resolve()))


def load_source(path: Path) -> Source:
    return read_compact(path) if path.suffix == ".npz" else read_source(path, "cifar10")


def pack(source_path: Path, out: Path, train: int, test: int) -> None:
    """The first `train` training and `test` test images of a CIFAR-10 source, zlib-compressed."""
    src = read_source(source_path, "cifar10")
    tr, te = src.splits["train"], src.splits["test"]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, train_images=tr.images[:train], train_labels=tr.labels[:train],
                        test_images=te.images[:test], test_labels=te.labels[:test], classes=np.array(src.classes))
    print(f"wrote {out}: {min(train, len(tr.labels)):,} training and {min(test, len(te.labels)):,} test images, "
          f"{out.stat().st_size / 2**20:.1f} MiB")


def tiled(source: Source, train_size: int) -> Source:
    """The training split repeated up to `train_size` images, so that epochs time as full-size ones."""
    tr = source.splits["train"]
    if not train_size or train_size <= len(tr.labels):
        return source
    take = np.resize(np.arange(len(tr.labels)), train_size)
    splits = dict(source.splits, train=Split(tr.images[take], tr.labels[take]))
    return Source(source.dataset, source.classes, splits, source.origin)


# ---------------------------------------------------------------- the stage runner


class Check:
    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.device = args.device
        self.started = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.result = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv), "device": args.device, "budget_s": args.budget,
                       "running": None, "stages": {}}
        self.must_failed: str | None = None

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.started, 1)
        path = self.out / RESULT
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, path)

    def stage(self, name: str, fn, cuda_only: str | None = None, must: bool = False, budgeted: bool = False):
        """Runs `fn()` (returns a dict of figures) as stage `name`; `cuda_only`: the reason it is skipped on the CPU;
        `budgeted`: a full run, limited by the time left of --budget rather than the stage limit."""
        record = {"status": "SKIP"}
        begin = time.monotonic()
        if self.must_failed:
            record["reason"] = f"{self.must_failed} failed"
        elif self.args.only and not must and name not in self.args.only.split(","):
            record["reason"] = "not asked for (--only)"
        elif cuda_only and self.device != "cuda":
            record["reason"] = f"needs CUDA: {cuda_only}"
        elif budgeted and self.left() < 1:
            record["reason"] = f"no time left of the {self.args.budget:g} s budget"
        else:
            self.result["running"] = name
            self.save()
            limit = self.left() if budgeted else self.sizes.stage_timeout
            try:
                with _alarm(limit):
                    figures = fn() or {}
                record = {"status": "PASS", **figures}
            except Skip as e:
                record = {"status": "SKIP", "reason": str(e)}
            except StageTimeout:
                record = {"status": "FAIL", "reason": f"timed out after {limit:g} s"}
            except BaseException as e:  # noqa: BLE001 - every failure is recorded, the next stage runs
                if isinstance(e, KeyboardInterrupt):
                    raise
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                record = {"status": "FAIL", "reason": reason,
                          "traceback": traceback.format_exc().splitlines()[-12:]}
            finally:
                _free_memory()
        record["seconds"] = round(time.monotonic() - begin, 2)
        if must and record["status"] != "PASS":
            self.must_failed = self.must_failed or name
        self.result["stages"][name] = record
        self.result["running"] = None
        self.save()
        detail = record.get("reason") or record.get("summary", "")
        print(f"{name:<24} {record['status']:<4} {record['seconds']:7.1f} s  {detail}", flush=True)
        return record


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raises StageTimeout in the main thread after `seconds` (a wait on FFCV's loader thread included), and
    again every 5 s after that: an exception raised inside a C callback (numba's compiler calls some) is dropped."""
    def ring(signum, frame):
        raise StageTimeout()

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds, 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the stages


class Stages:
    def __init__(self, check: Check, work: Path):
        self.check, self.work = check, work
        self.sizes, self.device = check.sizes, check.device
        self.betons = work / "data" / "cifar10"
        self.runs = work / "runs"

    def config(self, name: str = "speed94", overrides=(), short: bool = True):
        """A shipped config, reading this check's betons on this check's device (short: the small stages' sizes)."""
        from train.config import load_config

        sets = [f"data.beton_dir={self.betons}", f"train.device={self.device}"]
        if short:
            sets += [f"data.subset={self.sizes.short_images}", f"data.test_subset={self.sizes.short_test}",
                     f"data.batch_size={self.sizes.short_batch}"]
        return load_config(ROOT / "configs" / f"{name}.yaml", sets + list(overrides))

    # 1. what is there
    def environment(self) -> dict:
        import numba
        import torch

        import fastloader  # noqa: F401 - first: it lets numba cache what importing ffcv compiles

        figures = {"python": platform.python_version(), "torch": torch.__version__, "numba": numba.__version__,
                   "numpy": np.__version__, "cuda_available": torch.cuda.is_available()}
        for module in ("ffcv", "pytorch_grad_cam", "cv2", "ttach"):
            imported = __import__(module)
            figures[module] = getattr(imported, "__version__", "imported")
        import ffcv._libffcv  # noqa: F401 - the C extension (libturbojpeg, OpenCV)

        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch sees no CUDA device")
            props = torch.cuda.get_device_properties(0)
            figures.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                           gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                           gpus=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported(),
                           nccl=".".join(map(str, torch.cuda.nccl.version())))
            try:
                figures["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # older torch: no emulation argument
                figures["bf16_native"] = figures["bf16_supported"]
        figures["summary"] = figures.get("gpu", "CPU") + f", torch {torch.__version__}"
        return figures

    # 2. the betons, written by fastcifar's writer
    def betons_stage(self) -> dict:
        from beton.writer import write_betons

        args = self.check.args
        if args.cifar:
            source = load_source(Path(args.cifar))
        else:
            n = args.synthetic_train or (12000 if self.device == "cuda" else 512)
            source = synthetic_source(n, args.synthetic_test or (2000 if self.device == "cuda" else 256))
        distinct = len(source.splits["train"].labels)
        source = tiled(source, args.tile_train)
        manifest = write_betons(source, self.betons, force=True)
        counts = {s: int(manifest["splits"][s]["count"]) for s in ("train", "test")}
        return {"source": source.origin, "train_images": counts["train"], "distinct_train_images": distinct,
                "test_images": counts["test"],
                "summary": f"{counts['train']:,} training ({distinct:,} distinct), {counts['test']:,} test images"}

    # 3. loaders: the device paths against the CPU path on the same indices
    def _epoch(self, loader, epoch: int = 0) -> list:
        loader.set_epoch(epoch)
        return [(x.detach().float().cpu().clone(), y.cpu().clone(), i.clone()) for x, y, i in loader.batches()]

    def _compare(self, a: list, b: list) -> dict:
        if len(a) != len(b):
            raise AssertionError(f"{len(a)} batches on one path, {len(b)} on the other")
        diffs = []
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
            if not torch_equal(ia, ib) or not torch_equal(ya, yb):
                raise AssertionError("the two paths gave different indices or labels")
            diffs.append((xa - xb).abs().flatten())
        import torch

        d = torch.cat(diffs)
        return {"batches": len(a), "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                "share_over_1e-3": float((d > 1e-3).float().mean())}

    def _data(self, **extra):
        from fastloader.config import DataConfig

        s = self.sizes
        augment = self.config("final_resnet18_layernorm").data.augment  # crop (reflect), rotate, cutout (mean fill)
        base = dict(beton_dir=str(self.betons), batch_size=s.compare_batch, subset=s.compare_images,
                    test_subset=s.compare_images // 2, augment=augment, seed=3, drop_last=False)
        return DataConfig(**{**base, **extra})

    def loader_kernel_cuda(self) -> dict:
        """The uint8 kernel output crossing to CUDA, normalised there, against the CPU kernel's own normalisation."""
        import torch

        from fastloader.loaders import build_loader

        data = self._data()
        cpu = self._epoch(build_loader(data, "train", "cpu"))
        cuda_loader = build_loader(data, "train", "cuda")
        first = cuda_loader.batches()
        x, y, _ = next(first)
        first.close()  # ends that epoch (FFCV's thread released) before the compared one starts
        if x.device.type != "cuda" or y.device.type != "cuda" or x.dtype != torch.float32 or y.dtype != torch.int64:
            raise AssertionError(f"batch on {x.device}/{y.device} as {x.dtype}/{y.dtype}")
        if not x.is_contiguous(memory_format=torch.channels_last):
            raise AssertionError("images not channels_last")
        figures = self._compare(cpu, self._epoch(cuda_loader))
        test = self._compare(self._epoch(build_loader(data, "test", "cpu")),
                             self._epoch(build_loader(data, "test", "cuda")))
        bf16 = self._epoch(build_loader(data, "train", "cuda", torch.bfloat16))
        bf16_err = max(float(((xb - xa).abs() / (xa.abs() + 1)).max()) for (xa, _, _), (xb, _, _) in zip(cpu, bf16))
        if figures["max_abs_diff"] > 1e-4 or test["max_abs_diff"] > 1e-4 or bf16_err > 1e-2:
            raise AssertionError(f"CUDA and CPU batches differ: train {figures['max_abs_diff']:.2e}, test "
                                 f"{test['max_abs_diff']:.2e}, bf16 relative {bf16_err:.2e}")
        figures.update(test_max_abs_diff=test["max_abs_diff"], bf16_max_rel_diff=bf16_err,
                       summary=f"{figures['batches']} batches equal within {figures['max_abs_diff']:.1e}")
        return figures

    def augment_on_device(self) -> dict:
        """`augment_where: device` on this check's device against the loader (numba) path on the CPU."""
        from fastloader.loaders import build_loader

        loader_path = self._epoch(build_loader(self._data(), "train", "cpu"))
        device_path = self._epoch(build_loader(self._data(augment_where="device"), "train", self.device))
        figures = self._compare(loader_path, device_path)
        # rotation: the two paths agree within interpolation rounding (normalised units)
        if figures["max_abs_diff"] > 1e-3:
            raise AssertionError(f"device and loader augmentations differ by {figures['max_abs_diff']:.2e}")
        figures["summary"] = f"{figures['batches']} batches within {figures['max_abs_diff']:.1e} on {self.device}"
        return figures

    def batch_of_one(self) -> dict:
        """Final batches of one image in train and test (on CUDA, FFCV's ToDevice sees N = 1)."""
        from fastloader.loaders import build_loader

        b = self.sizes.compare_batch
        data = self._data(subset=b + 1, test_subset=b + 1)
        shapes = {}
        for split in ("train", "test"):
            last = self._epoch(build_loader(data, split, self.device))[-1]
            shapes[split] = (tuple(last[0].shape), tuple(last[1].shape))
            if tuple(last[1].shape) != (1,) or last[0].shape[0] != 1:
                raise AssertionError(f"{split}: last batch images {tuple(last[0].shape)}, labels {tuple(last[1].shape)}")
        return {"last_batches": shapes, "summary": "train and test end with a batch of 1"}

    # 4. one step per precision, the fit's own RunParts and Step
    def precision(self, name: str):
        def run() -> dict:
            import torch

            from train.parts import build
            from train.state import start_training
            from train.step import train_step

            if name == "fp16" and self.device != "cuda":
                raise Skip("fp16 with a GradScaler is CUDA-only (train.hardware.resolve_precision)")
            cfg = self.config(overrides=[f"train.precision={name}", f"data.subset={self.sizes.step_images}"])
            parts = build(cfg)
            training = start_training(parts)
            before = [p.detach().clone() for p in parts.model.parameters()]
            losses, batches = [], iter(parts.train_loader)
            for _ in range(self.sizes.steps):
                images, labels = next(batches)
                if images.dtype != parts.precision.batch_dtype:
                    raise AssertionError(f"batch in {images.dtype}, precision {name} wants {parts.precision.batch_dtype}")
                loss, logits = train_step(training.step, images, labels)
                losses.append(float(loss))
            batches.close()
            if not all(math.isfinite(v) for v in losses):
                raise AssertionError(f"losses {losses}")
            moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, parts.model.parameters()))
            if not moved:
                raise AssertionError("no parameter changed")
            figures = {"losses": [round(v, 4) for v in losses], "parameters_changed": moved,
                       "scaler_enabled": training.step.scaler.is_enabled()}
            if name == "fp16":
                if not training.step.scaler.is_enabled():
                    raise AssertionError("fp16 without a GradScaler")
                figures["scale"] = float(training.step.scaler.get_scale())
            figures["summary"] = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
            return figures
        return run

    # 5. a short fit, its resume, the checkpoint read on the CPU
    def fit_resume(self) -> dict:
        import torch

        from train import checkpoint
        from train.loop import fit
        from train.models import create_model
        from train.run import RunDir

        sets = ["train.epochs=2", "train.whitening_bias_epochs=1", "scheduler.role_epochs.whitening_bias=1"]
        cfg = self.config(overrides=sets)
        resumed, whole = RunDir(self.runs / "resumed"), RunDir(self.runs / "whole")
        begin = time.perf_counter()
        fit(cfg, resumed, stop_after=1)
        history = fit(cfg, resumed, resume=True)
        seconds = time.perf_counter() - begin
        reference = fit(cfg, whole)
        if len(history) != 2 or not all(math.isfinite(m["train_loss"]) for m in history):
            raise AssertionError(f"resumed history {history}")
        state = checkpoint.load(resumed.last, map_location="cpu")
        if any(v.device.type != "cpu" for v in state["model"].values()):
            raise AssertionError("checkpoint tensors not on the CPU")
        cpu_model = create_model(cfg.model, num_classes=10)
        cpu_model.load_state_dict(state["model"])
        cpu_model.eval()
        device_model = create_model(cfg.model, num_classes=10).to(self.device)
        device_model.load_state_dict(checkpoint.load(resumed.last, map_location=self.device)["model"])
        device_model.eval()
        x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = cpu_model(x), device_model(x.to(self.device)).cpu()
        agree = float((a.argmax(1) == b.argmax(1)).float().mean())
        logit_diff = float((a - b).abs().max())
        if agree < 0.95:
            raise AssertionError(f"the checkpoint on the CPU agrees with {self.device} on {agree:.0%} of inputs")
        resumed_w = state["model"]
        whole_w = checkpoint.load(whole.last, map_location="cpu")["model"]
        weight_diff = max(float((resumed_w[k].float() - whole_w[k].float()).abs().max()) for k in resumed_w)
        return {"epochs": len(history), "test_acc": [m["test_acc"] for m in history],
                "uninterrupted_test_acc": [m["test_acc"] for m in reference], "resume_vs_whole_max_weight_diff":
                weight_diff, "cpu_vs_device_argmax_agreement": agree, "cpu_vs_device_max_logit_diff": logit_diff,
                "fit_and_resume_seconds": round(seconds, 2),
                "summary": f"resumed run ends {history[-1]['test_acc']:.2f}% (uninterrupted "
                           f"{reference[-1]['test_acc']:.2f}%, weights within {weight_diff:.1e}); CPU load agrees "
                           f"{agree:.0%}"}

    # 6. the analysis with Grad-CAM, on the run's device
    def analysis(self) -> dict:
        from analysis.report import analyze

        run = self.runs / "resumed"
        if not (run / "checkpoint_last.pt").is_file():
            raise Skip("no run to analyse (fit_resume failed)")
        lines: list[str] = []
        result = analyze(run, n=8, log=lines.append)
        if result.loaded.device.type != self.device:
            raise AssertionError(f"the analysis ran on {result.loaded.device}, not {self.device}")
        cams = np.asarray(result.cams)
        if cams.size and not (np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1):
            raise AssertionError("Grad-CAM maps outside [0, 1]")
        missing = [str(p) for p in result.files.values() if not Path(p).is_file()]
        if missing:
            raise AssertionError(f"missing {missing}")
        return {"test_acc": result.predictions.accuracy, "cams": len(cams), "layer": result.layer,
                "seconds_by_part": {k: round(v, 2) for k, v in result.seconds.items()},
                "summary": f"{len(cams)} CAMs at {result.layer}, test accuracy {result.predictions.accuracy:.2f}%"}

    # 7. collectives, and the DDP wrap through airnet's whitening-bias freeze
    def ddp(self) -> dict:
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from train.loop import train_epoch
        from train.parts import build
        from train.state import start_training

        backend = "nccl" if self.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        try:
            device = torch.device(self.device, 0) if self.device == "cuda" else torch.device("cpu")
            t = torch.arange(4, dtype=torch.float32, device=device)
            dist.all_reduce(t)
            box = [{"rank": 0}]
            dist.broadcast_object_list(box, src=0, device=device if self.device == "cuda" else None)
            gathered = [torch.zeros_like(t)]
            dist.all_gather(gathered, t)
            dist.barrier()
            if not torch.equal(t.cpu(), torch.arange(4.0)) or box[0] != {"rank": 0}:
                raise AssertionError("a collective changed its data")
            sets = ["train.epochs=3", "train.whitening_bias_epochs=1", "scheduler.role_epochs.whitening_bias=1"]
            parts = build(self.config(overrides=sets))
            training = start_training(parts)
            training.step.model = DistributedDataParallel(parts.model, device_ids=[0] if self.device == "cuda" else None)
            losses, stepped = [], []
            for epoch in range(parts.cfg.train.epochs):  # the freeze comes at the start of the second epoch
                training.begin_epoch(epoch, parts.cfg)
                stepped.append(type(training.step.model).__name__)  # what begin_epoch left the step to train
                progress = train_epoch(parts, training, epoch)
                losses.append(round(progress.loss_sum.item() / max(progress.count, 1), 4))
            if not all(math.isfinite(v) for v in losses):
                raise AssertionError(f"losses {losses}")
        finally:
            dist.destroy_process_group()
        return {"backend": backend, "epoch_losses": losses, "step_model_by_epoch": stepped,
                "summary": f"{backend} collectives; DDP through the freeze ({', '.join(stepped)}), losses {losses}"}

    # 8. torch.compile through the fit
    def compile_stage(self) -> dict:
        from train.loop import fit
        from train.run import RunDir

        cfg = self.config(overrides=["train.epochs=1", "train.compile=true"])
        begin = time.perf_counter()
        history = fit(cfg, RunDir(self.runs / "compiled"))
        seconds = time.perf_counter() - begin
        if not math.isfinite(history[-1]["train_loss"]):
            raise AssertionError(f"loss {history[-1]['train_loss']}")
        return {"seconds_with_compile": round(seconds, 2), "test_acc": history[-1]["test_acc"],
                "summary": f"one epoch compiled in {seconds:.1f} s, test accuracy {history[-1]['test_acc']:.2f}%"}

    # 9. with the time left: the shipped configs at full length
    def estimate(self, cfg) -> tuple[float, float]:
        """(seconds for the whole run, seconds per epoch) from a few timed real steps (train.budget.epoch_seconds)."""
        from train.parts import build
        from train.budget import epoch_seconds

        begin = time.perf_counter()
        parts = build(cfg)
        cost = epoch_seconds(parts)
        setup = time.perf_counter() - begin
        per_epoch = cost.train + cost.evaluation
        del parts
        return setup + cfg.train.epochs * per_epoch + cost.last_extra, per_epoch

    def _fits(self, cfg, margin: float = 1.15, extra: float = 10.0) -> dict:
        if not self.sizes.estimate:  # the dry run: eight timed steps of seed A's ResNet18 would take minutes
            return {}
        total, per_epoch = self.estimate(cfg)
        if cfg.scheduler.max_lr == "find":  # the LR range test first: up to 100 steps, about an epoch
            total += per_epoch
        need, left = total * margin + extra, self.check.left()
        figures = {"estimated_seconds": round(need, 1), "estimated_epoch_seconds": round(per_epoch, 2)}
        if need > left:
            raise Skip(f"needs about {need:.0f} s ({cfg.train.epochs} epochs at {per_epoch:.1f} s), {left:.0f} s left")
        return figures

    def speed94(self) -> dict:
        from train.speedrun import one_run

        cfg = self.config(overrides=self.sizes.long_overrides, short=False)
        figures = self._fits(cfg)
        runs = []
        for seed in range(self.sizes.speed_seeds):
            if runs and max(r["seconds"] for r in runs) * 1.2 + 5 > self.check.left():
                break
            seeded = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=seed),
                                         train=dataclasses.replace(cfg.train, seed=seed))
            r = one_run(seeded, self.runs / f"speed94_seed{seed}")
            runs.append({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
            self.check.result["speed94_runs_so_far"] = runs  # kept if the check is killed mid-stage
            self.check.save()
        self.check.result.pop("speed94_runs_so_far", None)
        acc = [r["accuracy"] for r in runs]
        sec = [r["seconds"] for r in runs]
        figures.update(runs=runs, seeds=len(runs), mean_accuracy=round(statistics.mean(acc), 2),
                       mean_seconds=round(statistics.mean(sec), 2),
                       reference="airbench94_muon: 2.59 s on an A100 (published)",
                       reference_seconds=AIRBENCH94_MUON_A100_SECONDS,
                       summary=f"{len(runs)} seeds: {statistics.mean(acc):.2f}% mean in {statistics.mean(sec):.2f} s "
                               f"mean (airbench94_muon: {AIRBENCH94_MUON_A100_SECONDS} s on an A100)")
        return figures

    def full_run(self, name: str, overrides=()):
        def run() -> dict:
            from train.loop import fit
            from train.run import RunDir

            cfg = self.config(name, overrides=list(self.sizes.long_overrides) + list(overrides), short=False)
            figures = self._fits(cfg)
            begin = time.perf_counter()
            history = fit(cfg, RunDir(self.runs / name))
            seconds = time.perf_counter() - begin
            best = max(history, key=lambda m: m["test_acc"])
            figures.update(epochs=len(history), seconds=round(seconds, 1), final_test_acc=history[-1]["test_acc"],
                           best_test_acc=best["test_acc"], best_epoch=best["epoch"],
                           summary=f"{len(history)} epochs in {seconds:.0f} s: {history[-1]['test_acc']:.2f}% final, "
                                   f"{best['test_acc']:.2f}% best (epoch {best['epoch']})")
            return figures
        return run


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the check; cpu: the dry run (tiny sizes, CUDA-only stages skipped)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--cifar", help="CIFAR-10 source: cifar-10-batches-py folder, its tarball, or a --pack .npz")
    source.add_argument("--synthetic", action="store_true", help="made-up images instead of CIFAR")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json (default: %(default)s)")
    p.add_argument("--work", help="folder for betons and runs (default: a temporary folder, removed at the end)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check; the full runs take what is left (default: 540 on CUDA, "
                        "so that the wheels' install and the check fit 10 minutes on one H100; 3600 on the CPU, "
                        "where the dry run's full runs are one short epoch each)")
    p.add_argument("--tile-train", type=int, default=0,
                   help="repeat the training images up to this many, so that epochs time as full-size ones")
    p.add_argument("--synthetic-train", type=int, default=0, help="--synthetic: training images")
    p.add_argument("--synthetic-test", type=int, default=0, help="--synthetic: test images")
    p.add_argument("--skip-full-runs", action="store_true", help="stop after the CUDA paths")
    p.add_argument("--only", help="comma-separated stages to run (the environment and the betons always run)")
    p.add_argument("--pack", nargs=2, metavar=("CIFAR_SOURCE", "OUT_NPZ"),
                   help="write the compact source (the first --pack-train/--pack-test images) and exit")
    p.add_argument("--pack-train", type=int, default=12000)
    p.add_argument("--pack-test", type=int, default=4000)
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 540.0 if args.device == "cuda" else 3600.0
    if not args.pack and not (args.cifar or args.synthetic):
        p.error("give --cifar PATH or --synthetic")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pack:
        try:
            pack(Path(args.pack[0]), Path(args.pack[1]), args.pack_train, args.pack_test)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    sizes = GPU if args.device == "cuda" else DRY
    check = Check(args, sizes)
    with contextlib.ExitStack() as stack:
        if args.work:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        os.environ.setdefault("FASTCIFAR_CACHE", str(work / "cache"))  # precision: auto's measurement
        st = Stages(check, work)
        check.stage("environment", st.environment, must=True)
        check.stage("betons", st.betons_stage, must=True)
        check.stage("loader_kernel_cuda", st.loader_kernel_cuda,
                    cuda_only="uint8 kernel output, ToDevice and normalisation on the GPU")
        check.stage("batch_of_one", st.batch_of_one)
        check.stage("augment_on_device", st.augment_on_device)
        for name in ("fp32", "bf16", "fp16"):
            check.stage(f"step_{name}", st.precision(name))
        check.stage("fit_resume_cpu_load", st.fit_resume)
        check.stage("analysis_gradcam", st.analysis)
        check.stage("ddp_nccl_freeze", st.ddp)
        check.stage("torch_compile", st.compile_stage,
                    cuda_only="checked on CUDA (inductor's C++ build of the CPU kernels takes minutes on a small CPU)")
        if not args.skip_full_runs:
            check.stage("speed94_seeds", st.speed94, budgeted=True)
            check.stage("seed_a_final_resnet18_layernorm", st.full_run("final_resnet18_layernorm"), budgeted=True)
            # the dry run's one short epoch: fixed LRs instead of the range test, the peak inside the epoch, and the
            # 4 steps onecycle needs at least (DRY's 32 images in batches of 8, the last partial batch dropped)
            dry_lr = (("scheduler.max_lr=0.1", "scheduler.start_lr=0.01", "scheduler.peak_epoch=0.25",
                       "data.batch_size=8") if args.device == "cpu" else ())
            check.stage("seed_c_custom_resnet_onecycle", st.full_run("custom_resnet_onecycle", dry_lr), budgeted=True)
    counts = {s: sum(v["status"] == s for v in check.result["stages"].values()) for s in ("PASS", "FAIL", "SKIP")}
    check.result["counts"] = counts
    check.save()
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped; "
          f"{check.out / RESULT} ({time.monotonic() - check.started:.0f} s)")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written (gpu_check.json is replaced atomically after every stage). Seen on a 2-core Xeon:
    # after all stages passed, the interpreter's final garbage collection waited forever in numba's TBB pool
    # (`unload_tbb` -> `task_group::wait`), so a normal exit could hang the one device call; leave at once.
    os._exit(code)
