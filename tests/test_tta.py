"""Test-time augmentation (train.tta): flip, flip-and-translate, and TTA on the least confident images only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from beton.errors import UserError
from train.tta import least_confident_only, translate, tta_logits

from .test_airnet import _batch


class _Recorder(nn.Module):
    """A model that is not mirror-symmetric and records the memory format of its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.formats = []

    def forward(self, x):
        self.formats.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.conv(x).flatten(2).max(2).values * torch.linspace(1, 2, 5)


def test_tta_flip_is_the_mean_of_both_passes_and_flip_invariant():
    model = _Recorder()
    images = _batch()[0]
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1).contiguous(memory_format=torch.channels_last))
    model.formats.clear()
    out = tta_logits(model, images, "flip")
    assert torch.allclose(out, 0.5 * plain + 0.5 * mirrored, atol=1e-6)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # so the invariance below is not trivial
    assert torch.allclose(tta_logits(model, images.flip(-1).contiguous(memory_format=torch.channels_last), "flip"),
                          out, atol=1e-6)
    assert all(model.formats)  # every view kept channels_last
    assert torch.equal(tta_logits(model, images, "none"), plain)


def test_tta_flip_translate_weights_and_translation():
    model = _Recorder()
    images = _batch()[0]
    moved = translate(images, 1, 1)
    assert torch.equal(moved[..., 1:, 1:], images[..., :-1, :-1])  # one pixel down-right
    assert torch.equal(moved[..., 0, 1:], images[..., 1, :-1])  # filled by reflection
    flip = lambda x: tta_logits(model, x, "flip")
    expected = 0.5 * flip(images) + 0.25 * flip(translate(images, 1, 1)) + 0.25 * flip(translate(images, -1, -1))
    assert torch.allclose(tta_logits(model, images, "flip_translate"), expected, atol=1e-6)
    with pytest.raises(UserError, match="unknown test-time augmentation"):
        tta_logits(model, images, "rotate")


def test_least_confident_only_changes_just_the_least_confident():
    model = _Recorder()
    images = _batch()[0]
    plain, full = tta_logits(model, images, "none"), tta_logits(model, images, "flip")
    assert torch.equal(least_confident_only(model, images, "flip", 0.0), plain)
    assert torch.allclose(least_confident_only(model, images, "flip", 1.0), full, atol=1e-6)
    least = plain.softmax(1).amax(1).argsort()[:3]
    out = least_confident_only(model, images, "flip", 0.3)  # ceil(2.4) = 3 images
    changed = (out != plain).any(1).nonzero().flatten()
    assert set(changed.tolist()) == set(least.tolist())
    assert torch.allclose(out[least], full[least], atol=1e-6)
