"""Border modes (`fill: reflect | mean`) against albumentations / OpenCV given the same parameters, and the
two augmentation paths against each other."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from beton.errors import UserError
from fastloader import augs as A
from fastloader import device, kernel
from fastloader.augs.alt_flip import AlternatingFlip
from fastloader.augs.base import BORDER_REFLECT
from fastloader.device import DeviceAugment, warp
from fastloader.kernel import augment_batch, frozen
from fastloader.ops import FusedAugment
from fastloader.params import draw_params
from tests.fastloader_fixtures import synthetic_images

cv2 = pytest.importorskip("cv2")
alb = pytest.importorskip("albumentations")

N = 64
IMAGES = synthetic_images(N, seed=11)
INDICES = np.arange(1000, 1000 + N, dtype=np.int64)
MEAN = (125.307, 122.950, 113.865)  # CIFAR-10's training mean, 0..255 (as manifest.json holds it)
REFLECT = "reflect"


def run_kernel(augs, epoch=0, seed=3, out_dtype=np.uint8, mean=MEAN):
    table = A.pack(augs, mean=mean)
    out = np.empty((N, table.out_size, table.out_size, 3), out_dtype)
    offset = np.full(3, 0.5) if out_dtype == np.uint8 else np.zeros(3)
    augment_batch(IMAGES, out, INDICES, table.codes, table.settings, table.in_size, seed, epoch, table.fill,
                  *frozen(np.ones(3), offset), table.border)
    return out, draw_params(table, seed, epoch, INDICES)


def run_device(augs, epoch=0, seed=3, mean=MEAN):
    table = A.pack(augs, mean=mean)
    return warp(torch.from_numpy(IMAGES).permute(0, 3, 1, 2), draw_params(table, seed, epoch, INDICES), table).numpy()


def interior_diff(a, b, frame=2):
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return d[..., frame:-frame, frame:-frame, :] if frame else d


# ---- specs --------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ({"random_crop": {"fill": "refelct"}},
     "RandomCrop.fill must be a number or [r, g, b] in 0..255, 'mean' or 'reflect', got 'refelct'"),
    ({"rotate": {"fill": "Mean"}}, "RandomRotate.fill must be"),
    ({"shift_scale_rotate": {"fill": [1, 2, "reflect"]}}, "ShiftScaleRotate.fill must be"),
    ({"cutout": {"fill": "reflect"}}, "Cutout.fill must be a number or [r, g, b] in 0..255 or 'mean', got 'reflect'"),
    ({"cutout": {"fill": True}}, "Cutout.fill must be"),
])
def test_bad_fills_are_one_line_errors(entry, message):
    with pytest.raises(UserError) as e:
        A.make_aug(entry)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_words_are_kept_and_resolved_when_packed():
    crop, cut = A.make_aug({"random_crop": {"fill": "reflect"}}), A.make_aug({"cutout": {"fill": "mean"}})
    assert crop.fill == "reflect" and cut.fill == "mean"
    table = A.pack([crop, cut], mean=MEAN)
    assert table.border == BORDER_REFLECT
    layout = A.settings_layout(A.Cutout)
    assert table.settings[1, layout.fill:layout.fill + 3].tolist() == list(MEAN)
    table = A.pack([A.RandomRotate(fill="mean")], mean=MEAN)
    assert table.border == A.BORDER_CONSTANT and table.fill.tolist() == list(MEAN)
    with pytest.raises(UserError, match="fill 'mean' needs the training mean"):
        A.pack([cut])
    with pytest.raises(UserError, match=r"disagree on fill \('reflect', \[0.0, 0.0, 0.0\]\)"):
        A.pack([crop, A.RandomRotate(fill=0)])
    A.pack([crop, A.RandomRotate(fill="reflect"), A.ShiftScaleRotate(fill="reflect")])  # one shared border


def test_reflect101_indices_are_opencvs():
    for n in (1, 2, 5, 32):
        idx = np.arange(-3 * n - 7, 4 * n + 7)
        want = [cv2.borderInterpolate(int(i), n, cv2.BORDER_REFLECT_101) for i in idx]
        assert [kernel.reflect101(int(i), n) for i in idx] == want
        assert device.reflect101(torch.from_numpy(idx), n).tolist() == want


# ---- random crop: exact -------------------------------------------------------

@pytest.mark.parametrize("padding", [4, 40])
def test_reflect_crop_equals_albumentations_pad_then_crop(padding):
    """Exact, as an integer copy; padding 40 (more than the image) reflects again, as OpenCV does."""
    out, p = run_kernel([A.RandomCrop(32, padding, fill=REFLECT)])
    pad = alb.PadIfNeeded(32 + 2 * padding, 32 + 2 * padding, border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    for i in range(N):
        ox, oy = int(p[i, 1, 0]), int(p[i, 1, 1])
        padded = pad(image=IMAGES[i])["image"]
        ref = alb.Crop(x_min=ox, y_min=oy, x_max=ox + 32, y_max=oy + 32, p=1.0)(image=padded)["image"]
        np.testing.assert_array_equal(out[i], ref)
        np.testing.assert_array_equal(ref, np.pad(IMAGES[i], ((padding,) * 2, (padding,) * 2, (0, 0)),
                                                  mode="reflect")[oy:oy + 32, ox:ox + 32])


def test_reflect_crop_with_zero_rotation_and_flip_stays_an_exact_copy():
    crop, _ = run_kernel([A.RandomCrop(32, 4, fill=REFLECT)])
    out, _ = run_kernel([A.RandomCrop(32, 4, fill=REFLECT), A.RandomRotate(0.0, fill=REFLECT)])
    np.testing.assert_array_equal(out, crop)
    floats, _ = run_kernel([A.RandomCrop(32, 4, fill=REFLECT), A.RandomRotate(0.0, fill=REFLECT)],
                           out_dtype=np.float32)
    np.testing.assert_array_equal(floats, crop.astype(np.float32))  # no interpolation at all


# ---- rotation: within interpolation rounding ----------------------------------

@pytest.mark.parametrize("fill, border", [(REFLECT, "BORDER_REFLECT_101"), ((10, 200, 30), "BORDER_CONSTANT")])
def test_rotation_matches_albumentations_rotate(fill, border):
    """albumentations' Rotate: cv2.warpAffine about ((w - 1) / 2, (h - 1) / 2), positive = counter-clockwise,
    as ours; the difference is OpenCV's 1/32-pixel fixed-point bilinear."""
    out, p = run_kernel([A.RandomRotate(20.0, fill=fill)])
    mode = getattr(cv2, border)
    diffs, cv_diffs = [], []
    for i in range(N):
        angle = float(p[i, 1, 1])
        ref = alb.Rotate(limit=(angle, angle), interpolation=cv2.INTER_LINEAR, border_mode=mode,
                         fill=fill if mode == cv2.BORDER_CONSTANT else 0, p=1.0)(image=IMAGES[i])["image"]
        rot = cv2.getRotationMatrix2D((15.5, 15.5), angle, 1.0)
        cv = cv2.warpAffine(IMAGES[i], rot, (32, 32), flags=cv2.INTER_LINEAR, borderMode=mode,
                            borderValue=fill if mode == cv2.BORDER_CONSTANT else 0)
        diffs.append(interior_diff(out[i], ref))
        cv_diffs.append(interior_diff(out[i], cv))
    diffs = np.stack(diffs)
    assert diffs.mean() < 0.1 and diffs.max() <= 2, (diffs.mean(), diffs.max())  # measured: 7e-6 and 1
    assert np.array_equal(np.stack(cv_diffs), diffs)  # Rotate is that warpAffine
    if fill == REFLECT:  # the mirror is OpenCV's up to the edge, corners included
        whole = np.stack([interior_diff(out[i], alb.Rotate(limit=(float(p[i, 1, 1]),) * 2, border_mode=mode, p=1.0)(
            image=IMAGES[i])["image"], frame=0) for i in range(N)])
        assert whole.mean() < 0.1


def test_shift_scale_rotate_matches_opencv_warp_with_reflect():
    out, p = run_kernel([A.ShiftScaleRotate(0.2, 0.2, 45, fill=REFLECT, p=1.0)])
    diffs = []
    for i in range(N):
        _, dx, dy, scale, angle = p[i, 1, :5]
        m = cv2.getRotationMatrix2D((15.5, 15.5), angle, scale)
        m[:, 2] += (dx * 32, dy * 32)
        ref = cv2.warpAffine(IMAGES[i], m, (32, 32), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        diffs.append(interior_diff(out[i], ref, frame=0))
    assert np.mean(diffs) < 0.1 and np.max(diffs) <= 2


def test_rotated_crop_corners_read_the_padded_image_not_the_crop():
    """The documented difference (augs/__init__.py): crop + rotate are one warp of the source, so a rotated
    crop's corners show the reflect-padded image around the crop (what one warpAffine of the 32x32 source
    with the composed map and BORDER_REFLECT_101 gives), where albumentations' Pad -> Crop -> Rotate mirrors
    the 32x32 crop itself. The two agree away from the corners."""
    out, p = run_kernel([A.RandomCrop(32, 4, fill=REFLECT), A.RandomRotate(10.0, fill=REFLECT, p=1.0)])
    fused, corners, rest = [], [], []
    pad = alb.PadIfNeeded(40, 40, border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    for i in range(N):
        composed = p[i, 0].reshape(2, 3)  # ours maps output -> source: OpenCV's WARP_INVERSE_MAP
        fused.append(np.abs(out[i].astype(float) - cv2.warpAffine(
            IMAGES[i], composed, (32, 32), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT_101)).mean())
        ox, oy = int(p[i, 1, 0]), int(p[i, 1, 1])
        crop = pad(image=IMAGES[i])["image"][oy:oy + 32, ox:ox + 32]
        angle = float(p[i, 2, 1])
        seq = alb.Rotate(limit=(angle, angle), border_mode=cv2.BORDER_REFLECT_101, p=1.0)(image=crop)["image"]
        t = np.radians(angle)  # where each output pixel reads the crop
        sx = np.cos(t) * (xx - 15.5) - np.sin(t) * (yy - 15.5) + 15.5
        sy = np.sin(t) * (xx - 15.5) + np.cos(t) * (yy - 15.5) + 15.5
        outside = (sx < 0) | (sx > 31) | (sy < 0) | (sy > 31)
        inside = (sx >= 1) & (sx <= 30) & (sy >= 1) & (sy <= 30)
        d = np.abs(out[i].astype(float) - seq)
        corners.append(d[outside].mean())
        rest.append(d[inside].mean())
    assert np.mean(fused) < 0.1  # one warp of the source with OpenCV's reflect, corners included
    assert np.mean(rest) < 0.1  # the sequential pipeline's pixels wherever the turn stays inside the crop
    assert np.mean(corners) > 2.0  # and not in the corners, as documented


# ---- cutout: the manifest's mean ----------------------------------------------

def test_cutout_mean_equals_coarse_dropout_fill_in_the_same_box():
    aug = [A.Cutout(16, fill="mean")]
    out, p = run_kernel(aug, out_dtype=np.float32)
    out8, _ = run_kernel(aug)
    drop = alb.CoarseDropout(fill=MEAN, p=1.0)
    drop8 = alb.CoarseDropout(fill=tuple(np.round(MEAN)), p=1.0)  # uint8 output rounds, as every fill
    for i in range(N):
        y0, x0 = int(p[i, 1, 1]), int(p[i, 1, 2])
        holes = np.array([[x0, y0, x0 + 16, y0 + 16]])
        np.testing.assert_array_equal(out[i], drop.apply(IMAGES[i].astype(np.float32), holes=holes, seed=0))
        np.testing.assert_array_equal(out8[i], drop8.apply(IMAGES[i], holes=holes, seed=0))


def test_the_mean_reaches_both_paths_from_the_manifests_numbers():
    """FusedAugment (uint8 output: `fill_mean`; float output: its `mean`) and DeviceAugment resolve
    `fill: mean` from the numbers the loader passes them (the manifest's mean, 0..255)."""
    from ffcv.pipeline.state import State

    augs = [A.make_aug({"cutout": {"size": 32, "fill": "mean"}})]  # the whole image
    state = State(jit_mode=True, device=torch.device("cpu"), shape=(32, 32, 3), dtype=np.dtype(np.uint8))
    for op, dtype, want in ((FusedAugment(augs, fill_mean=MEAN), np.uint8, np.round(MEAN)),
                            (FusedAugment(augs, mean=MEAN, std=(60.0, 60.0, 60.0)), np.float32, (0, 0, 0))):
        op.declare_state_and_memory(state)
        dst = np.empty((4, 32, 32, 3), dtype)
        op.generate_code()(IMAGES[:4], dst, INDICES[:4])
        np.testing.assert_allclose(dst, np.broadcast_to(want, dst.shape), atol=1e-5)
    out = DeviceAugment(augs, 0, MEAN, (60.0, 60.0, 60.0))(torch.from_numpy(IMAGES[:4]).permute(0, 3, 1, 2),
                                                        INDICES[:4], 0)
    assert out.abs().max() < 1e-5
    with pytest.raises(UserError, match="fill 'mean' needs the training mean"):
        FusedAugment(augs).declare_state_and_memory(state)


# ---- both paths ---------------------------------------------------------------

@pytest.mark.parametrize("augs, atol", [
    ([A.RandomCrop(32, 4, fill=REFLECT), A.RandomHorizontalFlip(), A.Cutout(16, fill="mean")], 0.0),
    ([A.RandomCrop(32, 40, fill=REFLECT), AlternatingFlip()], 0.0),
    ([A.RandomCrop(32, 4, fill=REFLECT), A.RandomRotate(5.0, p=0.5, fill=REFLECT), A.Cutout(16, p=0.5, fill="mean")],
     1e-3),
    ([A.ShiftScaleRotate(0.3, 0.2, 60, fill=REFLECT, p=1.0), A.Grayscale(0.5)], 1e-3),
    ([A.RandomCrop(32, 4, fill="mean"), A.RandomRotate(20.0, fill="mean")], 1e-3),
])
def test_device_path_equals_loader_path(augs, atol):
    kernel_out, _ = run_kernel(augs, epoch=5, out_dtype=np.float32)
    assert np.abs(run_device(augs, epoch=5) - kernel_out).max() <= atol * 255


def test_bench_loader_takes_an_augmentation_list(tmp_path):
    from fastloader.cli import _augment_list
    from fastloader.config import DataConfig

    seed_a = ("[{random_crop: {size: 32, padding: 4, fill: reflect}}, {rotate: {max_degrees: 5, p: 0.5, "
              "fill: reflect}}, {cutout: {size: 16, p: 0.5, fill: mean}}]")
    assert _augment_list(seed_a)[2] == {"cutout": {"size": 16, "p": 0.5, "fill": "mean"}}
    DataConfig(augment=_augment_list(seed_a))  # valid without a manifest: the mean comes with the loader
    config = tmp_path / "exp.yaml"
    config.write_text("data:\n  augment: [alt_flip, {random_crop: {fill: reflect}}]\n")
    assert _augment_list(str(config)) == ["alt_flip", {"random_crop": {"fill": "reflect"}}]
    with pytest.raises(UserError, match=r"^data.augment\[0\]: RandomCrop.fill must be .*got 'refelct'$"):
        _augment_list("[{random_crop: {fill: refelct}}]")


def test_bench_loader_augment_names_a_missing_file():
    from fastloader.cli import _augment_list

    with pytest.raises(UserError, match="--augment: file not found: /no/such/augment.yaml"):
        _augment_list("/no/such/augment.yaml")
