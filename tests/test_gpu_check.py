"""scripts/gpu_check.py: its dry run on the CPU, the stage runner's promises, the compact source (docs/gpu.md)."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from beton.errors import UserError
from beton.sources import read_source
from tests.test_bad_inputs import make_cifar10

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
CUDA_ONLY = {"loader_kernel_cuda", "step_fp16", "torch_compile"}


def load_script():
    if "gpu_check" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.mark.slow
def test_dry_run_passes_every_stage_the_cpu_can_run(tmp_path):
    """The whole check on the CPU, as `make gpu-check-dry` runs it: the CUDA-only stages SKIP, all others PASS."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--synthetic", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=400)
    result = json.loads((out / "gpu_check.json").read_text())
    stages = result["stages"]
    failed = {k: v.get("reason") for k, v in stages.items() if v["status"] == "FAIL"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert {k for k, v in stages.items() if v["status"] == "SKIP"} == CUDA_ONLY
    assert all(stages[k]["reason"].startswith("needs CUDA") or k == "step_fp16" for k in CUDA_ONLY)
    assert result["running"] is None and result["counts"] == {"PASS": len(stages) - 3, "FAIL": 0, "SKIP": 3}
    for name in stages:  # one line per stage on stdout
        assert sum(line.startswith(name + " ") for line in proc.stdout.splitlines()) == 1
    # the stages ran fastcifar's code and recorded its figures
    assert stages["fit_resume_cpu_load"]["epochs"] == 2
    assert stages["ddp_nccl_freeze"]["backend"] == "gloo" and len(stages["ddp_nccl_freeze"]["epoch_losses"]) == 3
    assert stages["speed94_seeds"]["seeds"] == 1
    assert stages["seed_a_final_resnet18_layernorm"]["epochs"] == 1


def _args(tmp_path):
    gpu_check = load_script()
    return gpu_check, gpu_check.parse_args(["--device", "cpu", "--synthetic", "--out", str(tmp_path)])


def test_a_failing_stage_is_recorded_and_the_next_one_runs(tmp_path):
    gpu_check, args = _args(tmp_path)
    check = gpu_check.Check(args, gpu_check.DRY)
    seen = []

    def broken():
        seen.append(json.loads((tmp_path / "gpu_check.json").read_text())["running"])
        raise ValueError("the kernel wrote past the batch\nsecond line")

    check.stage("first", broken)
    check.stage("second", lambda: {"summary": "fine", "value": 3})
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert seen == ["first"]  # the JSON names the stage in progress, for a run killed in it
    first, second = result["stages"]["first"], result["stages"]["second"]
    assert first["status"] == "FAIL" and first["reason"] == "ValueError: the kernel wrote past the batch"
    assert any("broken" in line for line in first["traceback"])
    assert second == {"status": "PASS", "summary": "fine", "value": 3, "seconds": second["seconds"]}
    assert result["running"] is None


def test_cuda_only_stages_skip_on_the_cpu_and_a_failed_must_stage_skips_the_rest(tmp_path):
    gpu_check, args = _args(tmp_path)
    check = gpu_check.Check(args, gpu_check.DRY)
    ran = []
    check.stage("gpu", lambda: ran.append("gpu"), cuda_only="the GPU kernel")
    check.stage("needed", lambda: 1 / 0, must=True)
    check.stage("later", lambda: ran.append("later"))
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert ran == []
    assert stages["gpu"] == {"status": "SKIP", "reason": "needs CUDA: the GPU kernel", "seconds": 0.0}
    assert stages["needed"]["status"] == "FAIL"
    assert stages["later"]["status"] == "SKIP" and stages["later"]["reason"] == "needed failed"


def test_full_runs_skip_once_the_budget_is_spent(tmp_path):
    gpu_check, args = _args(tmp_path)
    args.budget = 0.5
    check = gpu_check.Check(args, gpu_check.DRY)
    time.sleep(0.6)
    ran = []
    check.stage("short", lambda: ran.append("short"))  # the CUDA paths run whatever the budget
    check.stage("full", lambda: ran.append("full"), budgeted=True)
    assert ran == ["short"]
    full = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["full"]
    assert full["status"] == "SKIP" and full["reason"] == "no time left of the 0.5 s budget"


def test_a_stage_that_hangs_fails_at_its_limit(tmp_path):
    gpu_check, args = _args(tmp_path)
    check = gpu_check.Check(args, gpu_check.DRY)
    begin = time.monotonic()
    check.sizes = dataclasses.replace(check.sizes, stage_timeout=0.5)
    record = check.stage("hangs", lambda: time.sleep(30))
    assert record["status"] == "FAIL" and record["reason"] == "timed out after 0.5 s"
    assert time.monotonic() - begin < 5


def test_compact_source_holds_the_first_images_exactly(tmp_path):
    gpu_check = load_script()
    folder = make_cifar10(tmp_path / "cifar-10-batches-py", per_batch=6)
    assert gpu_check.main(["--pack", str(folder), str(tmp_path / "c.npz"), "--pack-train", "20",
                           "--pack-test", "4"]) == 0
    full, compact = read_source(folder), gpu_check.load_source(tmp_path / "c.npz")
    for split, n in (("train", 20), ("test", 4)):
        np.testing.assert_array_equal(compact.splits[split].images, full.splits[split].images[:n])
        np.testing.assert_array_equal(compact.splits[split].labels, full.splits[split].labels[:n])
    assert compact.classes == full.classes and compact.dataset == "cifar10"
    tiled = gpu_check.tiled(compact, 50)
    assert len(tiled.splits["train"].labels) == 50 and len(tiled.splits["test"].labels) == 4
    np.testing.assert_array_equal(tiled.splits["train"].images[20:40], compact.splits["train"].images)


@pytest.mark.parametrize("arrays, message", [
    ({"train_images": np.zeros((2, 32, 32, 3), np.uint8)}, "not a compact CIFAR file"),
    ({k: np.zeros((2, 32, 32), np.uint8) if k.endswith("images") else np.zeros(2, np.int64)
      for k in ("train_images", "train_labels", "test_images", "test_labels")} | {"classes": np.array(["a"])},
     "train images must be uint8 N x 32 x 32 x 3"),
])
def test_a_bad_compact_source_is_a_user_error(tmp_path, arrays, message):
    gpu_check = load_script()
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=message):
        gpu_check.load_source(tmp_path / "bad.npz")
