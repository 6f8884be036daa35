"""A stop request (SIGTERM, as a cluster scheduler sends before it kills) is honoured in every phase: the first one
stops the command with exit code 143 and one line naming where it stopped and the command that continues; what
was complete is kept, and that command goes on without redoing complete work."""
from __future__ import annotations

import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from beton.errors import Interrupted
from train.run import RunDir
from train.stop import StopRequest

from .test_train import run_cli, tiny

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "stop_worker.py"
SIGTERM_EXIT = 128 + signal.SIGTERM  # 143, as a shell reports a process the signal ended


def small(betons: Path, **over) -> dict:
    """tiny() with an airnet 8/16/16 wide on 40 images, 1 epoch of 4 batches of 10, 20 test images, fp32 without
    augmentation: each phase is reached in as little work as there is (the LR range test's 100 steps are 100
    batches of 10; fastnet's took a second each on 2 cores)."""
    return tiny(betons, model__name="airnet", model__options={"widths": [8, 16, 16]}, train__epochs=1,
                train__precision="fp32", data__subset=40, data__test_subset=20, data__batch_size=10,
                data__workers=1, data__augment=[], **over)


def stopped(hook: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`fastcifar ARGV` that sends itself SIGTERM as `hook` (MODULE.FUNCTION@N) is called for the N-th time."""
    return subprocess.run([sys.executable, str(WORKER), hook, "--", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def stopped_here(hook: str, argv: list[str], capsys, monkeypatch) -> subprocess.CompletedProcess:
    """`stopped`, in this process: the same hook as stop_worker.py, without a process's imports and FFCV pipeline
    compilation (seconds each). What `stopped` alone shows: the exit code a real process ends with."""
    target, _, nth = hook.partition("@")
    module_name, _, name = target.rpartition(".")
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), []

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(nth):
            os.kill(os.getpid(), signal.SIGTERM)  # the command's handler is installed: it records the request
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, name, signalling)
        code, out = run_cli(argv, capsys)
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def complete(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text())["complete"]


# One sweep of two runs (a finds its max_lr with an LR range test), stopped by SIGTERM at the start of each phase in
# turn: each stop is checked, and the same command, run again, is checked to go on from what the last one kept.
# (hook, the line's `where`, what run a is then: "none" (no folder), "partial" (a checkpoint to resume), "complete"
# (no report.md), "analysed" (with it); how the next invocation takes up run a). The stop in training (loader
# threads mid-epoch) is sent to a `fastcifar` process of its own (stop_worker.py); the others arrive in this one.
PHASES = [
    ("set-up", "train.loop.build@1", "the LR range test stopped after 0 of 100 steps", "none", "train a ->"),
    ("LR range test", "train.lr_find.train_step@3", "the LR range test stopped after 2 of 100 steps", "none",
     "train a ->"),
    ("training", "train.loop.train_step@2", "checkpoint saved after batch 2 of epoch 1 in", "partial", "resume a in"),
    ("last evaluation", "train.loop.evaluate@1", "is complete, its analysis is not (no report.md)", "complete",
     "skip a:"),
    ("analysis", "analysis.report.predict@1", "is complete, its analysis is not (no report.md)", "complete",
     "skip a:"),
    ("between runs", "train.sweep.write_results@1", "1 of 2 runs complete", "analysed", "skip a:"),
]


@pytest.mark.slow
def test_the_first_sigterm_stops_a_sweep_in_every_phase_and_the_same_command_goes_on(learnable_betons, tmp_path,
                                                                                        capsys, monkeypatch):
    for name, over in (("a", {"scheduler__max_lr": "find"}), ("b", {})):
        raw = small(learnable_betons, **over)
        raw["name"] = name
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    argv = ["sweep", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "--out", str(out)]
    a, b = out / "a", out / "b"
    took_up, kept_checkpoint = None, None

    for phase, hook, where, kept, next_step in PHASES:
        proc = stopped(hook, argv) if phase == "training" else stopped_here(hook, argv, capsys, monkeypatch)
        assert proc.returncode == SIGTERM_EXIT, (phase, proc.stderr)
        assert "Traceback" not in proc.stderr, phase
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("interrupted: ") and where in last, (phase, last)
        assert last.endswith(f"; continue with: {shlex.join(['fastcifar', *argv])}"), phase  # the same sweep
        if took_up:  # this invocation went on from what the previous stop kept
            assert took_up in proc.stdout, (phase, proc.stdout)
        if kept_checkpoint is not None:  # a complete run is not trained again
            assert (a / "checkpoint_last.pt").read_bytes() == kept_checkpoint, phase
        assert not b.exists(), phase  # the first SIGTERM stopped it: the next run never started
        assert not list(out.rglob(".*.tmp")), phase  # nothing half-written
        if kept == "none":
            assert not a.exists(), phase
        elif kept == "partial":
            assert not complete(a) and torch.load(a / "checkpoint_last.pt", weights_only=True)["partial"]["batch"] == 2
        else:
            assert complete(a) and (a / "report.md").is_file() == (kept == "analysed"), phase
            assert "| [a.yaml]" in (out / "results.md").read_text(), phase  # results.md so far
            kept_checkpoint = (a / "checkpoint_last.pt").read_bytes()
        took_up = next_step

    code, rerun = run_cli(argv, capsys)
    assert code == 0, rerun.err
    assert "skip a:" in rerun.out and "train b ->" in rerun.out
    assert (a / "checkpoint_last.pt").read_bytes() == kept_checkpoint
    assert complete(a) and complete(b) and (a / "report.md").is_file() and (b / "report.md").is_file()
    assert [m["epoch"] for m in RunDir(a).metrics()] == [1]
    results = (out / "results.md").read_text()
    assert "| [a.yaml]" in results and "| [b.yaml]" in results


@pytest.mark.slow
def test_a_stop_in_the_last_evaluation_of_train_keeps_the_run_and_names_the_analysis(learnable_betons, tmp_path,
                                                                                     capsys, monkeypatch):
    """The stop arrives as the last epoch is evaluated: the run is complete, its analysis is left to `analyze`."""
    from train import loop

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small(learnable_betons)))
    run = tmp_path / "run"
    evaluate = loop.evaluate

    def signalling(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # fit's handler is installed: it only records the request
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", signalling)
    code, out = run_cli(["train", str(config), "--out", str(run)], capsys)
    assert code == SIGTERM_EXIT
    assert out.err.strip().splitlines()[-1] == (f"interrupted: the run in {run} is complete, its analysis is not "
                                                f"(no report.md); continue with: fastcifar analyze {run}")
    assert complete(run) and not (run / "report.md").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone with it
    monkeypatch.setattr(loop, "evaluate", evaluate)
    code, out = run_cli(["analyze", str(run)], capsys)
    assert code == 0 and (run / "report.md").is_file()


def test_an_abandonable_phase_ends_at_once_and_a_deferred_one_at_its_check():
    done = []

    def phase():
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("after the signal")

    with StopRequest(quiet=True) as request:
        with pytest.raises(Interrupted) as stop:
            request.abandonable(phase, where="in the phase", then="go on")
        assert (stop.value.where, stop.value.then, done) == ("in the phase", "go on", [])
        assert request.exit_code == SIGTERM_EXIT
        with pytest.raises(Interrupted):  # requested already: the next abandonable phase does not start
            request.abandonable(done.append, "started", where="next")
        assert done == []
    with StopRequest(quiet=True) as request, request.deferred():
        phase()  # recorded only
        assert done == ["after the signal"] and request.requested
        with pytest.raises(Interrupted, match="at the boundary"):
            request.check("at the boundary")
