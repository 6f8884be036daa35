"""train.checkpoint: probe steps (the LR range test, the budget's timing) leave the run's random state and
its loader's epoch as they were."""
from __future__ import annotations

import contextlib

import pytest
import torch

from train import checkpoint


class _Loader:
    def __init__(self):
        self.epoch = 4

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@pytest.mark.parametrize("fails", [False, True])
def test_rng_and_epoch_restored_around_probe_steps(fails):
    loader = _Loader()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with checkpoint.rng_and_epoch_restored(loader):
            torch.rand(100)
            loader.set_epoch(9)
            if fails:
                raise RuntimeError("a probe step failed")
    assert loader.epoch == 4 and torch.equal(torch.rand(3), expected)


def test_a_loader_without_an_epoch_is_left_alone():
    class Plain:
        def set_epoch(self, epoch):
            raise AssertionError("set_epoch called on a loader that keeps no epoch")

    torch.manual_seed(1)
    expected = torch.rand(2)
    torch.manual_seed(1)
    with checkpoint.rng_and_epoch_restored(Plain()):
        torch.rand(5)
    assert torch.equal(torch.rand(2), expected)
