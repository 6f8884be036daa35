"""Device and precision: where the run computes and in which dtype.

CUDA-only pieces (GradScaler for fp16, non_blocking copies) are kept here and
thin, since the CPU machines that run the tests cannot exercise them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from beton.errors import UserError


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
    return device


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
    """The Precision a name stands for. A run resolves `auto` by measurement first (`speed.auto_precision`,
    in `setup.build`); "auto" reaching here (a run saved before that, analysed now) means bf16 on the CPU,
    and on CUDA bf16 where supported, else fp16 with a GradScaler."""
    if name == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            name = "fp16"
        else:
            name = "bf16"
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if device.type != "cuda":
        raise UserError("train.precision fp16 needs a CUDA device; use bf16 (or auto) on the CPU")
    return Precision("fp16", torch.float16, True)
