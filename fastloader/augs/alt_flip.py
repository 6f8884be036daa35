"""alt_flip: airbench's alternating flip; over any two consecutive epochs each image is seen once mirrored.

A coin per image, drawn from (seed, dataset index) alone (`rng.index_key`, so
the same in every epoch), says whether the image is mirrored left-right in
even epochs; in odd epochs it is mirrored exactly when it was not in the
epoch before: flipped = coin XOR (epoch odd). Compared with `flip`'s fresh
coin each epoch, no image goes two epochs running without its mirror
(Keller Jordan, "94% on CIFAR-10 in 3.29 seconds", arXiv:2404.00498).
An exact map (columns reversed), like `flip`.
"""
from __future__ import annotations

from dataclasses import dataclass

from numba import njit

from ..rng import uniform
from .base import GEOMETRIC, Aug, Op, code_for, draws, then


@dataclass(frozen=True)
class AlternatingFlip(Aug):
    """Mirror left-right by a per-image coin in even epochs and by its opposite in odd ones (airbench)."""

    code = code_for("alt_flip")
    kind = GEOMETRIC


D = draws("flipped", "coin")  # this epoch's flip; the image's coin (its flip in even epochs)


@njit
def sample(key, stream, s, size, row, m, ikey, epoch):
    coin = uniform(ikey, stream, 0) < 0.5
    row[D.coin] = 1.0 if coin else 0.0
    if coin != (epoch % 2 == 1):
        row[D.flipped] = 1.0
        then(m, -1.0, 0.0, size - 1.0, 0.0, 1.0, 0.0)
    return size


OP = Op(AlternatingFlip, sample, D, sees_epoch=True)
