"""Test-time augmentation: average the logits of a few views of each test image (airbench).

Modes:
- "none": the model's logits.
- "flip": the mean of the logits of the image and of its horizontal mirror. Training flips
  images, so both views are in-distribution; the result is the same for an image and its mirror.
- "flip_translate": airbench94's level 2. 0.5 x flip(image) + 0.25 x flip(image moved `shift`
  pixels down-right) + 0.25 x flip(image moved `shift` pixels up-left), the moves taken from the
  image padded by reflection (as the training translations are): six passes, weighted as the
  views' probabilities under "flip half the time, translate half the time, both directions alike".
  `shift` defaults to airbench's 1 pixel (its TTA pads by 1 and crops at offsets 0 and 2).

`least_confident_only` spends the extra passes only where they can change an answer: the
`fraction` of images whose plain prediction is least confident (lowest max-softmax) get the TTA
logits, the others keep their plain logits (whose first pass is shared with the TTA).

Images are N x C x H x W, normalised, usually channels_last: every view keeps the input's memory
format. Run the model in eval mode (BatchNorm with running statistics), so a view's logits do
not depend on which other images share its batch. Logits come back in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from beton.errors import UserError

MODES = ("none", "flip", "flip_translate")


def _format(images: torch.Tensor) -> torch.memory_format:
    channels_last = images.ndim == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _view(images: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return images.contiguous(memory_format=fmt)


def translate(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The images moved dy pixels down and dx right (negative: up, left), reflection-filled."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    h, w = images.shape[-2:]
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def _flip_pair(model, images: torch.Tensor, fmt, first: torch.Tensor | None = None) -> torch.Tensor:
    plain = model(_view(images, fmt)).float() if first is None else first
    return 0.5 * plain + 0.5 * model(_view(images.flip(-1), fmt)).float()


def _tta(model, images: torch.Tensor, mode: str, shift: int, first: torch.Tensor | None = None,
         fmt: torch.memory_format | None = None) -> torch.Tensor:
    if mode not in MODES:
        raise UserError(f"unknown test-time augmentation {mode!r}; known: {', '.join(MODES)}")
    fmt = fmt or _format(images)
    if mode == "none":
        return model(_view(images, fmt)).float() if first is None else first
    logits = _flip_pair(model, images, fmt, first)
    if mode == "flip":
        return logits
    if shift < 1 or 2 * shift >= min(images.shape[-2:]):
        raise UserError(f"flip_translate: shift must be at least 1 and under half the image size, got {shift}")
    moved = [_flip_pair(model, translate(images, s, s), fmt) for s in (shift, -shift)]
    return 0.5 * logits + 0.25 * moved[0] + 0.25 * moved[1]


@torch.no_grad()
def tta_logits(model, images: torch.Tensor, mode: str = "flip", shift: int = 1) -> torch.Tensor:
    """The TTA logits (float32) of `images` under `mode` (see the module docstring)."""
    return _tta(model, images, mode, shift)


@torch.no_grad()
def least_confident_only(model, images: torch.Tensor, mode: str, fraction: float, shift: int = 1) -> torch.Tensor:
    """Plain logits, except for the ceil(fraction * N) images with the lowest max-softmax, which get TTA."""
    if not 0 <= fraction <= 1:
        raise UserError(f"least_confident_only: fraction must be in [0, 1], got {fraction}")
    if mode not in MODES:
        raise UserError(f"unknown test-time augmentation {mode!r}; known: {', '.join(MODES)}")
    fmt = _format(images)
    logits = model(_view(images, fmt)).float()
    count = math.ceil(fraction * len(images))
    if mode == "none" or count == 0:
        return logits
    confidence = logits.softmax(1).amax(1)
    chosen = confidence.argsort()[:count]
    out = logits.clone()
    out[chosen] = _tta(model, images[chosen], mode, shift, first=logits[chosen], fmt=fmt)
    return out


def eval_logits(model, images: torch.Tensor, cfg=None) -> torch.Tensor:
    """The logits evaluation uses under `eval:` settings (an EvalConfig; None: a plain forward pass)."""
    if cfg is None or cfg.tta == "none":
        return model(images)
    if cfg.tta_fraction < 1:
        return least_confident_only(model, images, cfg.tta, cfg.tta_fraction, cfg.tta_shift)
    return tta_logits(model, images, cfg.tta, cfg.tta_shift)
