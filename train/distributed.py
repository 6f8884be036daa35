"""DistributedDataParallel under torchrun: the process group, one device per rank, and the few collectives the loop needs.

torchrun (PyTorch's own launcher) sets RANK, LOCAL_RANK, WORLD_SIZE and the
rendezvous address; `setup` reads them, so `torchrun ... fastcifar train CFG`
needs nothing of ours. Without them (or with WORLD_SIZE=1) every function here
is a no-op and the run is a plain single-process one.

A collective that waits longer than `train.dist_timeout` seconds (a rank
crashed or hangs) raises instead of hanging; `Lost` turns that into one line.
"""
from __future__ import annotations

import atexit
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from beton.errors import UserError


class Lost(UserError):
    """Another rank stopped or stopped answering: this rank ends too."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes the run folder and prints progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from e


def launched() -> World:
    """The world torchrun describes in the environment (SINGLE when not launched by it)."""
    size = _env_int("WORLD_SIZE") or 1
    if size <= 1:
        return SINGLE
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local is None or not os.environ.get("MASTER_ADDR"):
        raise UserError("WORLD_SIZE > 1 but RANK, LOCAL_RANK or MASTER_ADDR is missing; launch with torchrun")
    return World(rank, local, size)


def current() -> World:
    """The world of the initialised process group (SINGLE if none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), _env_int("LOCAL_RANK") or 0, dist.get_world_size())


def setup(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU); returns this rank's device."""
    world = launched()
    if not world.active:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                            f"use --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"rank {world.rank}: cannot join the process group: {str(e).splitlines()[0]}") from e
        atexit.register(shutdown)
    return world, device


_broken = False  # a collective failed: destroying the group could wait on the dead peer


def mark_broken() -> None:
    global _broken
    _broken = True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized() and not _broken:
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of `values` over all ranks, in float64 (counts stay exact)."""
    if not current().active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (a stop request seen by one rank stops all at the same batch)."""
    if not current().active:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def on_main(fn, device: torch.device):
    """Run `fn` on rank 0 only; a UserError there is raised on every rank, so none waits for a dead peer."""
    world = current()
    if not world.active:
        return fn()
    message, result = None, None
    if world.main:
        try:
            result = fn()
        except UserError as e:
            message = str(e)
    box = [message]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    if box[0] is not None:
        raise UserError(box[0]) if world.main else UserError(f"rank 0 failed: {box[0]}")
    return result


def from_main(value, device: torch.device):
    """Rank 0's `value` on every rank (a config whose `max_lr: find` each rank resolved on its own shard)."""
    if not current().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank, so all ranks hold and evaluate the same model."""
    if not current().active:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around `model` (gradients averaged over ranks in backward); the model itself when single-process."""
    if not current().active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rewrap(wrapped: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A new DDP around `wrapped`'s model, after the set of its parameters that require grad changed.

    DDP fixes the parameters it reduces when it is built and expects a gradient for each of them in
    every backward; a parameter frozen later (airnet's whitening bias) never gets one, and the next
    step fails ("Expected to have finished reduction in the prior iteration"). Its supported answer
    is a new wrapper: the old one's autograd hooks are removed first, so its reducer stays silent.
    Every rank must call this at the same step (the new wrapper checks shapes and broadcasts rank 0's
    weights). One process (`wrapped` is the model itself): nothing to do.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(wrapped, DistributedDataParallel):
        return wrapped
    wrapped._remove_autograd_hooks()
    return wrap(wrapped.module, device)


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm -> SyncBatchNorm: statistics over the global batch instead of each rank's share."""
    if not current().active:
        return model
    if device.type != "cuda":
        raise UserError("model.sync_bn needs CUDA devices: torch's SyncBatchNorm does not run on the CPU "
                        "(set model.sync_bn: false; each rank then normalises over its share of the batch)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def reason(error: BaseException) -> str:
    """The gist of a backend error: its first sentence, without gloo's or NCCL's source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0] if str(error).strip() else "")
    return text.split(". ")[0].rstrip(".") or type(error).__name__


def is_lost_peer(error: BaseException) -> bool:
    """Whether `error` comes from a collective whose peer died or timed out."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and current().active and any(
        s in text for s in ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset"))
