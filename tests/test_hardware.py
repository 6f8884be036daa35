"""CPU memory reuse (train.hardware.reuse_freed_memory): freed blocks are kept for the next step."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import build_config
from train.parts import build

from .test_train import tiny


_FAULTS = """
import resource, sys, torch
from train.hardware import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else False
def step():  # a training step's large blocks: allocated, written, freed
    x = torch.empty(16 << 20)  # 64 MB, above glibc's largest mmap threshold (32 MB)
    x.fill_(1.0)
    del x
for _ in range(5):  # the first steps fault their memory in either way (until the heap's layout settles)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not platform.libc_ver()[0] == "glibc",
                    reason="glibc's malloc only")
def test_reused_memory_is_not_faulted_in_again_at_every_step():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent.parent).stdout.split()
        return out[0] == "True", int(out[1])

    (applied_off, off), (applied_on, on) = faults("off"), faults("on")
    assert not applied_off and applied_on
    assert off > 4 * 16000  # 64 MB is 16,384 pages, mapped and faulted again at every step
    assert on < 1000, on  # the freed block is reused


@pytest.mark.parametrize("reuse", [True, False])
def test_build_reuses_freed_memory_on_the_cpu_unless_told_not_to(learnable_betons, monkeypatch, reuse):
    from train import parts

    calls = []
    monkeypatch.setattr(parts, "reuse_freed_memory", lambda: calls.append(1))
    build(build_config(tiny(learnable_betons, train__reuse_memory=reuse, train__precision="fp32")))
    assert calls == ([1] if reuse else [])
