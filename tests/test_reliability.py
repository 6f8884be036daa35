"""Reproducibility and crash safety: Ctrl-C resumes exactly, loader threads do not change the weights,
a failed write keeps the previous checkpoint, SIGKILL at random moments loses nothing."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastloader.loaders import CifarLoader
from train.config import build_config
from train.loop import fit
from train.run import RunDir

from .test_train import run_cli, tiny

ROOT = Path(__file__).parent.parent


@pytest.fixture
def reference(tiny_run) -> RunDir:
    """An uninterrupted 3-epoch run of tiny(learnable_betons) the others must match exactly (trained once per
    session: tests/train_fixtures.py)."""
    return tiny_run.run


def weights(run: RunDir) -> dict:
    return torch.load(run.last, weights_only=True)["model"]


def assert_same_run(a: RunDir, b: RunDir) -> None:
    assert (a.path / "metrics.jsonl").read_bytes() == (b.path / "metrics.jsonl").read_bytes()
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_ctrl_c_saves_mid_epoch_and_resume_ends_where_an_uninterrupted_run_does(
        learnable_betons, reference, tmp_path, capsys, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons)))
    batches = CifarLoader.batches

    def interrupting(self):  # Ctrl-C while epoch 2's fourth batch is being trained
        epoch = self.epoch
        for i, batch in enumerate(batches(self)):
            if self.split == "train" and epoch == 1 and i == 3:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(CifarLoader, "batches", interrupting)
    run = RunDir(tmp_path / "run")
    code, out = run_cli(["train", str(config), "--out", str(run.path), "--no-analyze"], capsys)
    assert code == 130
    assert f"fastcifar train --resume {run.path}" in out.err and "batch 4 of epoch 2" in out.err
    assert "Traceback" not in out.err
    state = torch.load(run.last, weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["batch"] == 4  # the batch in flight was finished
    monkeypatch.setattr(CifarLoader, "batches", batches)
    code, out = run_cli(["train", "--resume", str(run.path), "--no-analyze"], capsys)
    assert code == 0, out.err
    assert "after batch 4 of epoch 2" in (run.path / "train.log").read_text()
    assert_same_run(run, reference)


def test_loader_threads_do_not_change_metrics_or_weights(learnable_betons, reference, tmp_path):
    assert tiny(learnable_betons)["data"]["workers"] == 2
    one = RunDir(tmp_path / "one")
    fit(build_config(tiny(learnable_betons, data__workers=1)), one)
    assert_same_run(one, reference)


@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EROFS])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(
        learnable_betons, tmp_path, capsys, monkeypatch, err_no):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons, train__epochs=2, data__subset=200, data__test_subset=100)))
    write_bytes, writes = Path.write_bytes, []

    def full_disk(self, data):
        if ".checkpoint_" in self.name:
            writes.append(self.name)
            if len(writes) > 2:  # epoch 1 wrote best and last; epoch 2 finds the disk full
                raise OSError(err_no, os.strerror(err_no))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    run = tmp_path / "run"
    code, out = run_cli(["train", str(config), "--out", str(run), "--no-analyze"], capsys)
    assert code == 2 and out.err.count("\n") == 1 and "Traceback" not in out.err
    assert out.err.startswith("error: cannot write") and os.strerror(err_no) in out.err
    assert "is intact" in out.err
    assert torch.load(run / "checkpoint_last.pt", weights_only=True)["epoch"] == 1
    assert not list(run.glob(".*.tmp"))  # the half-written temporary was removed
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    code, out = run_cli(["train", "--resume", str(run), "--no-analyze"], capsys)
    assert code == 0 and len(RunDir(run).metrics()) == 2


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(learnable_betons, reference, tmp_path,
                                                                            capsys):
    run = RunDir(tmp_path / "run")
    run.create(build_config(tiny(learnable_betons)).to_dict(), resume=False)  # what a kill in epoch 1 leaves
    (run.path / ".checkpoint_last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    code, out = run_cli(["train", "--resume", str(run.path), "--no-analyze"], capsys)
    assert code == 0 and "starting the run again" in out.err
    assert not list(run.path.glob(".*.tmp"))
    assert_same_run(run, reference)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(learnable_betons, tmp_path):
    """The short version of scripts/crash_resume.py (20 kills there, 2 here: the first lands within the first two
    epochs, compile and checkpoint writes included; test_crash_resume_kills_never_land_so_late... proves the
    windows leave every kill an epoch to hit)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(learnable_betons, train__epochs=6, data__subset=400)))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "crash_resume.py"), str(config), "--kills", "2",
                           "--seed", "1", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kills" in proc.stdout and "metrics.jsonl identical: True" in proc.stdout
    assert "final weights identical: True" in proc.stdout


@pytest.mark.slow
def test_checkpoint_every_n_batches_lets_a_crash_lose_less_and_resume_exactly(learnable_betons, reference, tmp_path,
                                                                              monkeypatch):
    from train import checkpoint

    cfg = build_config(tiny(learnable_betons, train__checkpoint_every=3))  # 10 batches an epoch
    save, saved = checkpoint.save, []

    def save_then_crash(path, state):
        save(path, state)
        saved.append((state["epoch"], (state["partial"] or {}).get("batch")))
        if saved[-1] == (1, 6):  # the process dies right after the checkpoint at epoch 2, batch 6
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, run)
    assert saved == [(0, 3), (0, 6), (0, 9), (1, None), (1, None), (1, 3), (1, 6)]  # and epoch 1 ends: best, last
    monkeypatch.setattr(checkpoint, "save", save)
    fit(cfg, run, resume=True)
    assert "after batch 6 of epoch 2" in (run.path / "train.log").read_text()
    assert_same_run(run, reference)


def test_crash_resume_kills_never_land_so_late_that_the_run_ends_before_all_kills():
    """The kill window shrinks with the epochs left: even a kill at the end of every window leaves the last
    attempt an epoch to run (the flake this replaced: 8 epochs, 3 kills, the run ended after 2)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("crash_resume", ROOT / "scripts" / "crash_resume.py")
    crash_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crash_resume)
    first, epoch = 8.4, 4.3
    for epochs, kills in [(6, 2), (8, 3), (3, 3), (24, 20), (5, 1)]:
        done = 0
        for kills_left in range(kills, 0, -1):
            window = crash_resume.kill_window(first, epoch, epochs - done, kills_left)
            assert 0 <= window <= first + epoch
            done += int(window // epoch)  # the most epochs a kill at the window's end lets finish
        assert done < epochs
    assert crash_resume.kill_window(first, epoch, 24, 1) == first + epoch  # room to spare: the first two epochs
