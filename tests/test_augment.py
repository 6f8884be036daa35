"""The fused kernel and the torch path against independent references, given the same parameters."""
from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from beton.errors import UserError
from fastloader import augmentations as A
from fastloader.device import warp
from fastloader.kernel import augment_batch, frozen
from fastloader.params import draw_params
from tests.fastloader_fixtures import synthetic_images

N = 64
IMAGES = synthetic_images(N, seed=11)
INDICES = np.arange(1000, 1000 + N, dtype=np.int64)


def run_kernel(augs, epoch=0, seed=3, images=IMAGES, indices=INDICES):
    """uint8 output of the fused kernel, with the parameters it drew."""
    table = A.pack(augs)
    out = np.empty((len(images), table.out_size, table.out_size, 3), np.uint8)
    augment_batch(images, out, indices, table.codes, table.settings, table.in_size, seed, epoch,
                  table.fill, *frozen(np.ones(3), np.full(3, 0.5)), table.border)
    return out, draw_params(table, seed, epoch, indices)


def test_crop_is_exact_padded_slice():
    out, p = run_kernel([A.RandomCrop(32, 4, fill=(10, 20, 30))])
    for i in range(N):
        padded = np.empty((40, 40, 3), np.uint8)
        padded[:] = (10, 20, 30)
        padded[4:36, 4:36] = IMAGES[i]
        ox, oy = int(p[i, 1, 0]), int(p[i, 1, 1])
        np.testing.assert_array_equal(out[i], padded[oy:oy + 32, ox:ox + 32])


def test_crop_to_smaller_size():
    out, p = run_kernel([A.RandomCrop(24, 0)])
    assert out.shape[1:] == (24, 24, 3)
    ox, oy = int(p[0, 1, 0]), int(p[0, 1, 1])
    np.testing.assert_array_equal(out[0], IMAGES[0, oy:oy + 24, ox:ox + 24])


def test_flip_is_exact_mirror():
    out, p = run_kernel([A.RandomHorizontalFlip(0.5)])
    flipped = p[:, 1, 0] == 1
    assert 0 < flipped.sum() < N
    np.testing.assert_array_equal(out[flipped], IMAGES[flipped][:, :, ::-1])
    np.testing.assert_array_equal(out[~flipped], IMAGES[~flipped])


def test_cutout_is_exact_square():
    out, p = run_kernel([A.Cutout(8, fill=(1, 2, 3))])
    for i in range(N):
        y0, x0 = int(p[i, 1, 1]), int(p[i, 1, 2])
        expected = IMAGES[i].copy()
        expected[y0:y0 + 8, x0:x0 + 8] = (1, 2, 3)
        np.testing.assert_array_equal(out[i], expected)


def test_rotation_matches_torchvision_bilinear_within_one_level():
    out, p = run_kernel([A.RandomRotate(5.0)])
    for i in range(8):
        angle = float(p[i, 1, 1])
        ref = TF.rotate(torch.from_numpy(IMAGES[i]).permute(2, 0, 1), angle,
                        interpolation=InterpolationMode.BILINEAR, fill=[0.0, 0.0, 0.0]).permute(1, 2, 0).numpy()
        diff = np.abs(out[i].astype(int) - ref.astype(int))[3:-3, 3:-3]  # away from the borders
        assert diff.max() <= 1, (i, angle, diff.max())


def test_crop_flip_cutout_without_rotation_equals_sequential_reference():
    out, p = run_kernel([A.RandomCrop(32, 4), A.RandomHorizontalFlip(), A.Cutout(16)])
    for i in range(N):
        padded = np.zeros((40, 40, 3), np.uint8)
        padded[4:36, 4:36] = IMAGES[i]
        ox, oy = int(p[i, 1, 0]), int(p[i, 1, 1])
        img = padded[oy:oy + 32, ox:ox + 32]
        if p[i, 2, 0]:
            img = img[:, ::-1]
        img = img.copy()
        y0, x0 = int(p[i, 3, 1]), int(p[i, 3, 2])
        img[y0:y0 + 16, x0:x0 + 16] = 0
        np.testing.assert_array_equal(out[i], img)


def test_zero_degree_rotation_is_an_exact_copy():
    out, _ = run_kernel([A.RandomRotate(0.0)])
    np.testing.assert_array_equal(out, IMAGES)


def test_grayscale_and_rgb_shift():
    out, p = run_kernel([A.Grayscale(1.0)])
    assert np.abs(out[..., 0].astype(int) - out[..., 2]).max() == 0
    luma = IMAGES.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out[..., 0] - luma).max() <= 0.51
    out, p = run_kernel([A.RGBShift(20, 20, 20, p=1.0)])
    shifted = np.clip(IMAGES + p[:, None, None, 1, 1:4], 0, 255)
    assert np.abs(out - shifted).max() <= 0.51


def test_same_seed_same_pixels_any_thread_count():
    augs = [A.RandomCrop(), A.RandomHorizontalFlip(), A.RandomRotate(), A.Cutout()]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, _ = run_kernel(augs)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many, _ = run_kernel(augs)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)
    other_epoch, _ = run_kernel(augs, epoch=1)
    assert (other_epoch != one).any(axis=(1, 2, 3)).mean() > 0.9


def test_parameters_cover_their_ranges_uniformly():
    table = A.pack([A.RandomCrop(32, 4), A.RandomHorizontalFlip(), A.RandomRotate(5.0), A.Cutout(16)])
    p = draw_params(table, seed=0, epoch=0, indices=np.arange(50_000))
    for col in (0, 1):  # crop offsets 0..8
        counts = np.bincount(p[:, 1, col].astype(int), minlength=9)
        assert len(counts) == 9 and np.all(np.abs(counts / 50_000 - 1 / 9) < 0.01)
    assert abs(p[:, 2, 0].mean() - 0.5) < 0.01  # flips
    angles = p[:, 3, 1]
    assert angles.min() < -4.99 and angles.max() > 4.99
    assert np.all(np.abs(np.histogram(angles, bins=10, range=(-5, 5))[0] / 50_000 - 0.1) < 0.01)
    for col in (1, 2):  # cutout corner 0..16
        counts = np.bincount(p[:, 4, col].astype(int), minlength=17)
        assert len(counts) == 17 and np.all(np.abs(counts / 50_000 - 1 / 17) < 0.01)
    assert not np.array_equal(p, draw_params(table, seed=0, epoch=1, indices=np.arange(50_000)))
    assert not np.array_equal(p, draw_params(table, seed=1, epoch=0, indices=np.arange(50_000)))


@pytest.mark.parametrize("augs, atol", [
    ([A.RandomCrop(32, 4), A.RandomHorizontalFlip(), A.Cutout(16)], 1e-5),
    ([A.RandomCrop(32, 4), A.RandomHorizontalFlip(), A.RandomRotate(5.0), A.Cutout(16)], 1e-3),
    ([A.ShiftScaleRotate(p=1.0), A.Grayscale(0.5), A.RGBShift(p=0.5)], 1e-3),
])
def test_device_path_equals_loader_path(augs, atol):
    table = A.pack(augs)
    kernel_out = np.empty((N, 32, 32, 3), np.float32)
    augment_batch(IMAGES, kernel_out, INDICES, table.codes, table.settings, 32, 3, 5, table.fill,
                  *frozen(np.ones(3), np.zeros(3)), table.border)
    images = torch.from_numpy(IMAGES).permute(0, 3, 1, 2)
    device_out = warp(images, draw_params(table, 3, 5, INDICES), table).numpy()
    assert np.abs(device_out - kernel_out).max() <= atol * 255


@pytest.mark.parametrize("entry, message", [
    ({"cutoutt": None}, "unknown augmentation 'cutoutt'"),
    ({"cutout": {"sz": 3}}, "unknown parameter(s) sz"),
    ({"rotate": {"p": 2}}, "probability"),
    ({"random_crop": {"padding": -1}}, "non-negative"),
    ({"cutout": {"fill": [1, 2]}}, "fill"),
])
def test_bad_augmentation_entries(entry, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        A.make_aug(entry)


def test_geometric_fills_must_agree():
    with pytest.raises(UserError, match="disagree on fill"):
        A.pack([A.RandomCrop(fill=0), A.RandomRotate(fill=128)])
