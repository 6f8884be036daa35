"""CUDA decisions on a machine without CUDA (torch.cuda monkeypatched): precision, the device index, the GPU
random states a resume restores; and train.deterministic, which on the CPU must be applied and still train."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import pytest
import torch

from beton.errors import UserError
from train import checkpoint, hardware
from train.config import build_config
from train.loop import fit
from train.run import RunDir

from .train_fixtures import tiny

CUDA = torch.device("cuda")


def gpus(monkeypatch, count: int, native_bf16: bool = True) -> list:
    """`count` visible GPUs (none: CUDA unavailable); returns the (device index, state) of each CUDA RNG restore.
    Without native bf16 (compute capability < 8: V100, T4), torch's bf16 check says yes only counting emulation."""
    restored: list = []

    def set_rng_state(state, device="cuda"):
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= count:  # torch indexes its per-GPU generators
            raise IndexError("list index out of range")
        restored.append((index, state))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: restored.append(("current", torch.device(device))))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    return restored


def states(n: int) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(n)]}


@pytest.mark.parametrize("saved, visible, restored, note", [
    (3, 1, [0], "the CUDA random state of 3 GPU(s), 1 are visible here: those of GPUs 1..2 were not restored"),
    (1, 2, [0], "the CUDA random state of 1 GPU(s), 2 are visible here: GPUs 1..1 keep their own"),
    (2, 2, [0, 1], None),
    (2, 0, [], "the CUDA random state of 2 GPU(s), 0 are visible here: those of GPUs 0..1 were not restored"),
])
def test_a_resume_restores_the_gpu_random_states_that_fit_and_says_what_did_not(monkeypatch, saved, visible,
                                                                                 restored, note):
    calls = gpus(monkeypatch, visible)
    said = checkpoint.set_rng_state(states(saved))
    assert [index for index, _ in calls] == restored
    assert all(torch.equal(state, torch.full((8,), index, dtype=torch.uint8)) for index, state in calls)
    assert said == note or (note is not None and note in said)


@pytest.mark.slow
def test_resuming_a_gpu_checkpoint_on_fewer_gpus_logs_what_was_not_restored(learnable_betons, tmp_path):
    cfg = build_config(tiny(learnable_betons, train__epochs=2, train__precision="fp32", train__device="cpu",
                            data__subset=100, data__test_subset=50, data__batch_size=50, data__augment=[]))
    run = RunDir(tmp_path / "run")
    fit(cfg, run, stop_after=1)
    state = checkpoint.load(run.last)
    checkpoint.save(run.last, {**state, "rng": states(2)})  # as written with 2 visible GPUs; resumed with none
    history = fit(cfg, run, resume=True)
    assert [m["epoch"] for m in history] == [1, 2]
    assert "2 GPU(s), 0 are visible here: those of GPUs 0..1 were not restored" in (run.path / "train.log").read_text()


def test_auto_precision_on_a_gpu_without_native_bf16_is_fp16_with_a_grad_scaler(monkeypatch):
    from train.models import create_model
    from train.config import ModelConfig
    from train.precision import auto_precision

    gpus(monkeypatch, 1, native_bf16=False)  # a V100: bf16 only emulated, slowly
    assert hardware.resolve_precision("auto", CUDA) == hardware.Precision("fp16", torch.float16, True)
    cfg = build_config({"model": {"name": "fastnet"}})
    assert auto_precision(cfg, create_model(ModelConfig(name="fastnet"), 10), CUDA, 10)[0] == "fp16"
    gpus(monkeypatch, 1, native_bf16=True)  # an A100
    assert hardware.resolve_precision("auto", CUDA).name == "bf16"
    assert auto_precision(cfg, create_model(ModelConfig(name="fastnet"), 10), CUDA, 10)[0] == "bf16"


def test_the_cuda_precision_is_decided_in_one_place():
    root = Path(__file__).resolve().parent.parent
    deciders = [str(p.relative_to(root)) for package in ("train", "fastloader", "analysis", "beton")
                for p in (root / package).rglob("*.py") if "is_bf16_supported(" in p.read_text()]
    assert deciders == [os.path.join("train", "hardware.py")]


def test_a_cuda_device_index_beyond_the_visible_gpus_is_one_line(monkeypatch):
    calls = gpus(monkeypatch, 2)
    with pytest.raises(UserError, match=r"train.device is 'cuda:2' but 2 CUDA device\(s\) are visible"):
        hardware.resolve_device("cuda:2")
    assert hardware.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert calls == [("current", torch.device("cuda", 1))]  # FFCV's streams are made on the current device
    gpus(monkeypatch, 0)
    with pytest.raises(UserError, match="no CUDA device is available"):
        hardware.resolve_device("cuda:0")


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def test_train_deterministic_is_applied_at_the_start_of_a_run_that_still_trains(learnable_betons, tmp_path,
                                                                                restore_determinism):
    torch.backends.cudnn.benchmark = True
    history = fit(build_config(tiny(learnable_betons, train__epochs=1, train__deterministic=True,
                                    data__subset=400, data__test_subset=100)), RunDir(tmp_path / "on"))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert math.isfinite(history[0]["train_loss"]) and history[0]["test_count"] == 100
    hardware.set_deterministic(False)  # the next run of a sweep without it
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert build_config({"model": {"name": "fastnet"}}).train.deterministic is False
    with pytest.raises(UserError, match="train.deterministic: expected bool"):
        build_config({"model": {"name": "fastnet"}, "train": {"deterministic": "yes"}})


def test_the_loaders_copy_to_the_gpu_before_reusing_a_host_buffer(learnable_betons, monkeypatch):
    # FFCV refills each pinned host buffer while the loop may still be batches ahead of the GPU: an asynchronous
    # copy from it could read the next batch's pixels (fastloader/loaders.py, where ToDevice is built, says why)
    from fastloader import loaders
    from fastloader.config import DataConfig

    made = []

    class Recording(loaders.ToDevice):
        def __init__(self, device, non_blocking=True):
            made.append(non_blocking)
            super().__init__(device, non_blocking)

    monkeypatch.setattr(loaders, "ToDevice", Recording)
    loaders.build_loaders(DataConfig(beton_dir=str(learnable_betons), batch_size=50, workers=1), CUDA)  # not iterated
    assert made and not any(made)
