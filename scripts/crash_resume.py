#!/usr/bin/env python3
"""Kill a training run with SIGKILL at random moments, resume it each time, and check nothing was lost.

    python scripts/crash_resume.py CONFIG [--kills 20] [--seed 0] [--work DIR] [--set key=value ...]

First an uninterrupted reference run of CONFIG; then the same run started,
SIGKILLed at a random moment, checked and resumed with `fastcifar train
--resume`, `--kills` times, then left to finish. Every fifth kill lands in
start-up (imports, creating the run folder); the others land in training,
within the time the reference took for its first two epochs (the first includes
compiling the loaders), so checkpoint writes are hit too, and never so late
that the run could finish before the kills left are spent.
After every kill, every checkpoint in the run folder must load with
`torch.load(weights_only=True)` and metrics.jsonl must parse (no half-written
file). At the end metrics.jsonl must be byte-identical to the reference's and
the final weights equal. Exit 0 when all holds, 1 otherwise.

Give the run a few epochs per kill (e.g. --set train.epochs=24 --set
data.subset=2000 for 20 kills): with fewer, the later kills land early in
their attempts.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

print = functools.partial(print, flush=True)  # noqa: A001 - progress as it happens
CLI = [sys.executable, "-m", "fastcifar_cli"]


def start(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=log, stderr=subprocess.STDOUT)


def wait_for_training(proc: subprocess.Popen, train_log: Path, size_before: int) -> float:
    """When the run logs its first line (training is about to start), or the process ends."""
    while proc.poll() is None:
        if train_log.is_file() and train_log.stat().st_size > size_before:
            break
        time.sleep(0.02)
    return time.perf_counter()


def check_folder(run: Path) -> list[str]:
    """Problems a kill left behind: a checkpoint torch cannot load, a metrics file that does not parse."""
    problems = []
    for ckpt in run.glob("checkpoint_*.pt"):
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            assert isinstance(state, dict) and "model" in state
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            problems.append(f"{ckpt.name}: {type(e).__name__}: {e}")
    for name in ("metrics.jsonl", "timing.jsonl"):
        path = run / name
        if path.is_file():
            try:
                [json.loads(line) for line in path.read_text().splitlines()]
            except ValueError as e:
                problems.append(f"{name}: {e}")
    return problems


def checkpointed(run: Path) -> int:
    """Epochs the run folder holds (lines of metrics.jsonl)."""
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def kill_window(first: float, epoch: float, remaining: int, kills_left: int) -> float:
    """Seconds after training starts within which the next kill lands: the reference's first two epochs, so
    that compiling and checkpoint writes are hit, but short enough that the run cannot finish before the
    kills left are spent (each kill may cost at most an equal share of the epochs left, with a margin for an
    attempt that runs faster than the reference did)."""
    share = max(remaining - 1, 0) / max(kills_left, 1)
    return max(min(first + epoch, 0.8 * share * epoch), 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--work", type=Path, default=None, help="folder for the two runs (default: a temporary one)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override, as for train")
    a = parser.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="crash-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    reference, killed = work / "reference", work / "killed"
    for folder in (reference, killed):
        shutil.rmtree(folder, ignore_errors=True)
    overrides = [x for s in a.sets for x in ("--set", s)]
    fresh = ["train", str(a.config), *overrides, "--no-analyze"]
    log = open(work / "output.log", "w")

    t0 = time.perf_counter()
    proc = start([*fresh, "--out", str(reference)], log)
    startup = wait_for_training(proc, reference / "train.log", 0) - t0
    if proc.wait() != 0:
        print(f"the reference run failed; see {work / 'output.log'}", file=sys.stderr)
        return 1
    timing = [json.loads(line) for line in (reference / "timing.jsonl").read_text().splitlines()]
    first = timing[0]["seconds"]  # includes compiling the loaders' pipelines
    epoch = sum(t["seconds"] for t in timing[1:]) / max(len(timing) - 1, 1)
    print(f"reference run: {time.perf_counter() - t0:.1f} s ({startup:.1f} s start-up, {len(timing)} epochs: "
          f"the first {first:.1f} s, then {epoch:.1f} s each)")
    if len(timing) < 2 * a.kills:
        print(f"note: {len(timing)} epochs for {a.kills} kills; the run may finish before all kills")

    rng = random.Random(a.seed)
    kills, resumes, problems = 0, 0, []
    while True:
        has_run = (killed / "config.yaml").is_file()
        log_size = (killed / "train.log").stat().st_size if (killed / "train.log").is_file() else 0
        began = time.perf_counter()
        proc = start(["train", "--resume", str(killed), "--no-analyze"] if has_run
                     else [*fresh, "--out", str(killed)], log)
        resumes += has_run
        if kills < a.kills:
            if kills % 5 == 4:
                when, deadline = "in start-up", began + rng.uniform(0, startup)
            else:
                when, deadline = "in training", wait_for_training(proc, killed / "train.log", log_size) + \
                    rng.uniform(0, kill_window(first, epoch, len(timing) - checkpointed(killed), a.kills - kills))
            try:
                proc.wait(timeout=max(deadline - time.perf_counter(), 0.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                found = check_folder(killed)
                problems += [f"after kill {kills}: {p}" for p in found]
                done = checkpointed(killed)
                print(f"kill {kills:>2} {when}, {time.perf_counter() - began:5.1f} s after start: "
                      f"{done} epoch(s) checkpointed{', ' + '; '.join(found) if found else ''}")
                continue
        else:
            proc.wait()
        if proc.returncode != 0:
            problems.append(f"a resumed run ended with exit code {proc.returncode}")
        break

    same_metrics = (killed / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    a_w = torch.load(reference / "checkpoint_last.pt", weights_only=True)["model"]
    b_w = torch.load(killed / "checkpoint_last.pt", weights_only=True)["model"]
    same_weights = a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    leftovers = [p.name for p in killed.glob(".*.tmp")]
    if not same_metrics:
        problems.append("metrics.jsonl differs from the uninterrupted run's")
    if not same_weights:
        problems.append("final weights differ from the uninterrupted run's")
    if leftovers:
        problems.append(f"temporary files left: {', '.join(leftovers)}")
    print(f"{kills} kills, {resumes} resumes; metrics.jsonl identical: {same_metrics}; "
          f"final weights identical: {same_weights}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print("OK" if not problems else f"FAILED; see {work}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
