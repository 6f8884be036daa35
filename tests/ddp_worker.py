"""One rank of a test's torchrun job: `fastcifar train` itself, with taps the test reads afterwards.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py RECORD -- train ARGS...

Each rank writes RECORD/rank<R>.json (the dataset indices it trained on, per
epoch) and RECORD/rank<R>.pt (its final weights). With FAIL_RANK=r and
FAIL_EPOCH=e in the environment, rank r raises at the start of epoch e (after
writing RECORD/failed_at), as a crashing rank would. With GLOO_SYNC_BN=1,
`model.sync_bn` runs on the CPU: torch's SyncBatchNorm refuses CPU tensors, so
`gloo_sync_bn_forward` stands in for its forward with the same statistics and
the same kind of collective (an all-reduce in every training-mode forward): a
rank that runs a training forward alone then waits, as it would on GPUs. (Its
layers are BatchNorm subclasses, not SyncBatchNorm, which DDP refuses on the CPU.)
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


def gloo_sync_bn_forward(self, x: torch.Tensor) -> torch.Tensor:
    """SyncBatchNorm's training forward over all ranks' samples, on gloo (statistics all-reduced, autograd through)."""
    if not (self.training and torch.distributed.is_initialized()):
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                              self.training, self.momentum, self.eps)
    from torch.distributed._functional_collectives import all_reduce

    c, dims = x.shape[1], [0, *range(2, x.ndim)]
    total = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / c])]), "sum",
                       torch.distributed.group.WORLD)
    n = total[-1]
    mean = total[:c] / n
    var = total[c:2 * c] / n - mean * mean
    with torch.no_grad():
        self.running_mean.lerp_(mean.detach(), self.momentum)
        self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        self.num_batches_tracked += 1
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def gloo_sync_batchnorm(model: torch.nn.Module, device) -> torch.nn.Module:
    """`distributed.sync_batchnorm` on gloo: each BatchNorm layer's class becomes a subclass with the forward above."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.__class__ = type(f"GlooSync{type(module).__name__}", (type(module),), {"forward": gloo_sync_bn_forward})
    return model


def dump() -> None:
    (record / f"rank{rank}.json").write_text(json.dumps({str(k): v for k, v in seen.items()}))
    if models:
        torch.save(models[-1].state_dict(), record / f"rank{rank}.pt")


if os.environ.get("GLOO_SYNC_BN") == "1":
    from train import distributed

    distributed.sync_batchnorm = gloo_sync_batchnorm
CifarLoader.batches = recording_batches
loop.build = capturing_build
loop.train_epoch = failing_train_epoch
record.mkdir(parents=True, exist_ok=True)
try:
    main(argv)
finally:
    dump()
