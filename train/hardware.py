"""Device and precision: where the run computes and in which dtype.

CUDA-only pieces (GradScaler for fp16, non_blocking copies) are kept here and
thin, since the CPU machines that run the tests cannot exercise them.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from beton.errors import UserError


def _cpuinfo(key: str) -> str | None:
    """The first value of `key` in /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo), else what platform knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def machine() -> str:
    """This machine in a few words, as every figure names it: the CPU model, its cores, whether it has AMX-BF16
    (which decides bf16's speed on Intel Xeons of one model name), and the GPU where torch sees one."""
    words = [cpu_model(), f"{os.cpu_count()} cores"]
    if "amx_bf16" in (_cpuinfo("flags") or "").split():
        words.append("AMX-BF16")
    if torch.cuda.is_available():
        words.append(torch.cuda.get_device_name())
    return ", ".join(words)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"train.device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but no CUDA device is available; use cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"train.device: unsupported device type {device.type!r} (use cpu or cuda)")
    if device.type == "cuda" and device.index is not None:
        visible = torch.cuda.device_count()
        if device.index >= visible:
            raise UserError(f"train.device is {name!r} but {visible} CUDA device(s) are visible "
                            f"(cuda:0..cuda:{visible - 1}; CUDA_VISIBLE_DEVICES renumbers them)")
        # the run's GPU becomes the current one: FFCV's loader creates its CUDA streams and events there
        torch.cuda.set_device(device)
    return device


def cuda_precision(device: torch.device) -> str:
    """What `precision: auto` is on a CUDA device: bf16 where the GPU computes it natively (compute capability
    8.0 and later: A100, H100, RTX 30xx on), else fp16 with a GradScaler. torch's `is_bf16_supported()` also
    counts emulated bf16, which V100s and T4s run, slowly: hence `including_emulation=False`. The one place
    this is decided (the run, its precision probe and `bench train` ask here)."""
    with torch.cuda.device(device):
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def set_deterministic(on: bool) -> None:
    """`train.deterministic`, applied at the start of every run (`parts.build`), either way, so that each run of a
    sweep gets its own setting.

    On: torch's deterministic algorithms, cuDNN's deterministic kernels without autotuning (benchmark off), and
    the cuBLAS workspace setting deterministic cuBLAS needs (CUBLAS_WORKSPACE_CONFIG, unless set already; cuBLAS
    reads it when a process first uses it). An operation with no deterministic CUDA kernel warns, naming itself,
    instead of stopping the run (warn_only): the rerun guarantee then does not cover it. The CPU computes
    deterministically either way; the cost on GPUs is unmeasured here."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_reusing = False  # reuse_freed_memory() took effect in this process


def reuse_freed_memory() -> bool:
    """Keep memory the CPU training step frees for its next allocations (`train.reuse_memory`).

    glibc's malloc serves every block above 32 MB with a fresh mmap and unmaps it when freed, so each
    training step's large activations and gradients (a batch-2000 activation of airnet is 262 MB) are
    page-faulted and zeroed again at every step: 6 million faults per 8 steps of speed94, a quarter of the
    step's time. With mmap off and trimming off, freed blocks return to malloc's heap and the next step
    reuses them. Written here because torch's CPU allocator caches nothing on desktop builds, and jemalloc
    or tcmalloc would have to be preloaded before Python starts. The process's memory then stays at its peak
    (a training run's working set). Returns False where the C library is not glibc (nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt parameters to speak of
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _reusing
    _reusing = _reusing or (bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)))
    return _reusing


def reusing_freed_memory() -> bool:
    """Whether `reuse_freed_memory` took effect in this process."""
    return _reusing


@dataclass(frozen=True)
class Precision:
    """How a step computes: autocast dtype (None: plain fp32) and whether a GradScaler is needed."""

    name: str
    autocast_dtype: torch.dtype | None
    scaled: bool

    @property
    def batch_dtype(self) -> torch.dtype:
        """The dtype the loaders deliver (the compute dtype: autocast would cast to it anyway)."""
        return self.autocast_dtype or torch.float32

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """fp16 scales the loss so small gradients survive; elsewhere the scaler is disabled (a no-op)."""
        return torch.amp.GradScaler(device.type, enabled=self.scaled)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The Precision a name stands for. A run resolves `auto` by measurement first (`precision.auto_precision`,
    in `parts.build`); "auto" reaching here (a run saved before that, analysed now) means bf16 on the CPU,
    and on CUDA bf16 where supported, else fp16 with a GradScaler."""
    if name == "auto":
        name = cuda_precision(device) if device.type == "cuda" else "bf16"
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if device.type != "cuda":
        raise UserError("train.precision fp16 needs a CUDA device; use bf16 (or auto) on the CPU")
    return Precision("fp16", torch.float16, True)
