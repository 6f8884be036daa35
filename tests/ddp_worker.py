"""One rank of a test's torchrun job: `fastcifar train` itself, with taps the test reads afterwards.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py RECORD -- train ARGS...

Each rank writes RECORD/rank<R>.json (the dataset indices it trained on, per
epoch) and RECORD/rank<R>.pt (its final weights). With FAIL_RANK=r and
FAIL_EPOCH=e in the environment, rank r raises at the start of epoch e (after
writing RECORD/failed_at), as a crashing rank would.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from fastcifar_cli import main
from fastloader.loaders import CifarLoader
from train import loop

record = Path(sys.argv[1])
argv = sys.argv[3:]  # after the "--"
rank = int(os.environ["RANK"])
seen: dict[int, list[int]] = {}
models = []

batches = CifarLoader.batches


def recording_batches(self):
    epoch = self.epoch
    for images, labels, indices in batches(self):
        if self.split == "train":
            seen.setdefault(epoch, []).extend(indices.tolist())
        yield images, labels, indices


build = loop.build


def capturing_build(*args, **kwargs):
    setup = build(*args, **kwargs)
    models.append(setup.model)
    return setup


train_epoch = loop.train_epoch


def failing_train_epoch(s, t, epoch, *args, **kwargs):
    if str(rank) == os.environ.get("FAIL_RANK") and str(epoch) == os.environ.get("FAIL_EPOCH"):
        (record / "failed_at").write_text(str(time.time()))
        raise RuntimeError(f"injected failure on rank {rank}")
    return train_epoch(s, t, epoch, *args, **kwargs)


def dump() -> None:
    (record / f"rank{rank}.json").write_text(json.dumps({str(k): v for k, v in seen.items()}))
    if models:
        torch.save(models[-1].state_dict(), record / f"rank{rank}.pt")


CifarLoader.batches = recording_batches
loop.build = capturing_build
loop.train_epoch = failing_train_epoch
record.mkdir(parents=True, exist_ok=True)
try:
    main(argv)
finally:
    dump()
