"""The one owner of torch's CPU thread count against FFCV.

FFCV calls `torch.set_num_threads(num_workers)` when a Loader is built and at every epoch start,
and importing it sets 1. Left alone, the model's CPU reductions (and so its weights) would depend
on `data.workers`, and anything timed before the first loader (the precision probe) would run on
one core. Every place that needs torch's threads calls `own_torch_threads()` after FFCV had its say.
"""
from __future__ import annotations

import os

import torch


def cpu_cores() -> int:
    """The cores this process may use (its share, when torchrun starts several on one machine):
    torch computes on all of them, whatever data.workers says."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def own_torch_threads() -> int:
    """Set torch's thread count to this process's cores (undoing FFCV's setting); returns it."""
    threads = cpu_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
