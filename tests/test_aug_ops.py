"""The op registry: one module per op, settings by name, draw streams, adding an op; vflip, the added one."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import torch

import fastloader
from beton.errors import UserError
from fastloader import augs
from fastloader.augs import MODULES, OPS, REGISTRY, make_aug, pack
from fastloader.augs.alt_flip import AlternatingFlip
from fastloader.augs.base import BOX, COLOUR, GEOMETRIC, Aug, Op, code_for, settings_layout
from fastloader.augs.cutout import Cutout
from fastloader.augs.vflip import RandomVerticalFlip
from fastloader.config import DataConfig
from fastloader.device import warp
from fastloader.kernel import augment_batch, frozen
from fastloader.params import draw_params
from fastloader.rng import stream
from tests.fastloader_fixtures import synthetic_images

N = 64
IMAGES = synthetic_images(N, seed=11)
INDICES = np.arange(1000, 1000 + N, dtype=np.int64)
LEGACY = {"random_crop": 0, "flip": 1, "rotate": 2, "shift_scale_rotate": 3, "cutout": 4, "grayscale": 5,
          "rgb_shift": 6}


def run_kernel(augs_, epoch=0, seed=3, out_dtype=np.uint8):
    table = pack(augs_)
    out = np.empty((N, table.out_size, table.out_size, 3), out_dtype)
    offset = np.full(3, 0.5) if out_dtype == np.uint8 else np.zeros(3)
    augment_batch(IMAGES, out, INDICES, table.codes, table.settings, table.in_size, seed, epoch, table.fill,
                  *frozen(np.ones(3), offset), table.border)
    return out, draw_params(table, seed, epoch, INDICES)


# ---- registry -----------------------------------------------------------------

def test_one_module_per_registered_op():
    folder = Path(augs.__file__).parent
    for name in MODULES:
        assert (folder / f"{name}.py").is_file()
        assert REGISTRY[name] is OPS[name].spec
    codes = [op.spec.code for op in OPS.values()]
    assert len(set(codes)) == len(codes)


def test_pre_registry_ops_keep_their_codes_and_new_ones_get_stable_codes():
    assert {name: REGISTRY[name].code for name in LEGACY} == LEGACY
    assert all(spec.code >= 16 for name, spec in REGISTRY.items() if name not in LEGACY)
    assert 16 <= code_for("invert") == code_for("invert") != code_for("inverse") < 2**32


def test_each_op_provides_what_its_kind_needs():
    for op in OPS.values():
        if op.spec.kind == COLOUR:
            assert op.colour is not None and op.colour_torch is not None
        if op.spec.kind == BOX:
            assert op.box is not None and op.box_torch is not None

    @dataclass(frozen=True)
    class Tint(Aug):
        code, kind = 999, COLOUR

    with pytest.raises(TypeError, match="needs colour, colour_torch"):
        Op(Tint, sample=None, draws=OPS["grayscale"].draws)


def test_packer_picks_up_every_registered_op():
    for name, spec in REGISTRY.items():
        table = pack([make_aug(name)])
        assert table.codes.tolist() == [spec.code]
        assert table.settings.shape == (1, augs.N_SETTINGS)
    cfg = DataConfig(augment=[{"random_crop": {"padding": 2}}, {"grayscale": {"p": 0.25}}])
    assert cfg.augmentations()[1] == REGISTRY["grayscale"](0.25)
    assert pack(cfg.augmentations()).codes.tolist() == [0, 5]


def test_unregistered_spec_is_refused():
    @dataclass(frozen=True)
    class Stray(Aug):
        p: float = 0.5
        code, kind = 12345, GEOMETRIC

    with pytest.raises(TypeError, match="not a registered augmentation"):
        pack([Stray()])


def test_named_ops_exist_for_every_registered_spec():
    from fastloader import ops

    for spec in REGISTRY.values():
        assert getattr(ops, spec.__name__)().augs == [spec()]
    assert ops.Cutout(8, p=0.3, seed=2).augs == [Cutout(8, p=0.3)]


# ---- settings by name ---------------------------------------------------------

def test_settings_layout_follows_the_fields():
    layout = settings_layout(Cutout)
    assert layout._fields == tuple(f.name for f in fields(Cutout))
    assert (layout.size, layout.fill, layout.p) == (0, 1, 4)  # an RGB fill takes three columns
    row = pack([Cutout(8, fill=(1, 2, 3), p=0.5)]).settings[0]
    assert row[layout.size] == 8 and row[layout.p] == 0.5
    assert row[layout.fill:layout.fill + 3].tolist() == [1, 2, 3]


def test_every_field_of_every_op_is_packed_under_its_name():
    for spec in REGISTRY.values():
        aug = spec()
        layout = settings_layout(spec)
        row = aug.settings(augs.N_SETTINGS)
        for f in fields(spec):
            value = getattr(aug, f.name)
            col = getattr(layout, f.name)
            got = row[col:col + len(value)].tolist() if isinstance(value, tuple) else row[col]
            assert got == (list(value) if isinstance(value, tuple) else value), (spec.__name__, f.name)


# ---- draw streams -------------------------------------------------------------

def test_streams_keep_the_old_formula_below_16_and_never_meet_above():
    old = {j * 16 + c for j in range(64) for c in range(16)}
    assert all(stream(j, c) == j * 16 + c for j in range(64) for c in range(16))
    codes = [code_for(n) for n in ("vflip", "invert", "a", "b")] + [16, 2**32 - 1]
    new = {stream(j, c) for j in range(64) for c in codes}
    assert len(new) == 64 * len(codes) and not new & old and min(new) >= 2**40


def test_recorded_draws_of_pre_registry_ops():
    """Values drawn by the kernel before the registry existed: runs stay reproducible across the change."""
    table = pack([make_aug(e) for e in ({"random_crop": {"padding": 4}}, "flip", {"rotate": {"max_degrees": 5}},
                                        {"cutout": {"size": 16}}, {"rgb_shift": {"p": 1.0}})])
    p = draw_params(table, seed=0, epoch=0, indices=np.arange(4))
    np.testing.assert_array_equal(p[:, 1, :2], RECORDED_CROP)
    np.testing.assert_array_equal(p[:, 2, 0], RECORDED_FLIP)
    np.testing.assert_allclose(p[:, 3, 1], RECORDED_ANGLE, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(p[:, 4, :3], RECORDED_CUTOUT)
    np.testing.assert_allclose(p[:, 5, 1:4], RECORDED_SHIFT, rtol=0, atol=1e-12)


RECORDED_CROP = [[4.0, 0.0], [2.0, 7.0], [5.0, 8.0], [0.0, 5.0]]
RECORDED_FLIP = [1.0, 1.0, 0.0, 1.0]
RECORDED_ANGLE = [4.654675593024238, -1.293163320597145, 3.5862568716623633, 3.1111555486505447]
RECORDED_CUTOUT = [[1.0, 1.0, 8.0], [1.0, 5.0, 5.0], [1.0, 6.0, 3.0], [1.0, 6.0, 9.0]]
RECORDED_SHIFT = [[-12.673463574150631, 12.827149637763968, -3.4279949283289612],
                  [1.8434325592994405, -15.937643406082067, -17.020270517427623],
                  [-4.626932019531513, 16.168503510865055, 0.96887117898941],
                  [15.228412758760586, -12.802056303945069, -18.9970398223114]]


# ---- adding an op from outside: one file, one registry line -------------------

INVERT = '''
"""invert: 255 - v on every channel with probability p (a test op)."""
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..rng import uniform
from .base import COLOUR, Aug, Op, code_for, draws, prob, settings_layout


@dataclass(frozen=True)
class Invert(Aug):
    p: float = 0.5
    code = code_for("invert")
    kind = COLOUR

    def __post_init__(self):
        prob(self.p, "Invert")


S = settings_layout(Invert)
D = draws("active")


@njit
def sample(key, stream, s, size, row, m):
    if uniform(key, stream, 0) < s[S.p]:
        row[D.active] = 1.0
    return size


@njit
def colour(v0, v1, v2, row, s):
    return np.float32(255.0) - v0, np.float32(255.0) - v1, np.float32(255.0) - v2


def colour_torch(out, rows, s, active):
    out.copy_((255.0 - out).where(active, out))


OP = Op(Invert, sample, D, colour=colour, colour_torch=colour_torch)
'''

CHECK = '''
import numpy as np, torch
from fastloader.config import DataConfig
from fastloader.augs import pack
from fastloader.kernel import augment_batch
from fastloader.params import draw_params
from fastloader.device import warp
from tests.fastloader_fixtures import synthetic_images

images = synthetic_images(32, seed=1)
augs = DataConfig(augment=[{"invert": {"p": 0.5}}, "flip"]).augmentations()
table = pack(augs)
out = np.empty_like(images)
idx = np.arange(32, dtype=np.int64)
augment_batch(images, out, idx, table.codes, table.settings, 32, 0, 0, table.fill, np.ones(3), np.full(3, 0.5),
              table.border)
p = draw_params(table, 0, 0, idx)
inv, flip = p[:, 1, 0] == 1, p[:, 2, 0] == 1
expected = np.where(inv[:, None, None, None], 255 - images, images)
expected = np.where(flip[:, None, None, None], expected[:, :, ::-1], expected)
assert 0 < inv.sum() < 32 and np.array_equal(out, expected)
device = warp(torch.from_numpy(images).permute(0, 3, 1, 2), p, table).numpy()
assert np.abs(device - expected).max() < 1e-3
print("ok")
'''


WARM = """
import numpy as np
from fastloader.augs import pack, make_aug
from fastloader.params import draw_params

draw_params(pack([make_aug("flip")]), 0, 0, np.arange(2))
print("ok")
"""


@pytest.mark.slow
def test_a_new_op_is_one_file_and_one_registry_line(tmp_path):
    """Copy fastloader, compile its parameter sampler into a cache, then add an op module and its name in
    MODULES: both paths run the op (the cached sampler, which does not know it, is not reused; the kernel's
    cache key carries the same salt, dispatch.SALT, and compiling it too would double the test's 70 s)."""
    import shutil

    package = Path(fastloader.__file__).parent
    shutil.copytree(package, tmp_path / "fastloader", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    shutil.copy(Path(__file__).parent / "fastloader_fixtures.py", tmp_path / "tests")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}

    def run(code):
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=600, env=env)
        assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]

    run(WARM)
    (tmp_path / "fastloader" / "augs" / "invert.py").write_text(textwrap.dedent(INVERT))
    registry = tmp_path / "fastloader" / "augs" / "__init__.py"
    text = registry.read_text()
    assert text.count('",\n)\n') == 1  # the end of MODULES
    registry.write_text(text.replace('",\n)\n', '",\n    "invert",\n)\n'))
    run(CHECK)


# ---- vflip: the op added as one file and one registry line --------------------

def test_vflip_is_registered_with_a_code_from_its_name():
    assert REGISTRY["vflip"] is RandomVerticalFlip and RandomVerticalFlip.code == code_for("vflip")
    cfg = DataConfig(augment=[{"random_crop": {"padding": 2}}, {"vflip": {"p": 0.25}}])
    assert cfg.augmentations()[1] == RandomVerticalFlip(0.25)
    assert pack(cfg.augmentations()).codes.tolist() == [0, RandomVerticalFlip.code]
    from fastloader import ops

    assert ops.RandomVerticalFlip(0.3, seed=2).augs == [RandomVerticalFlip(0.3)]


def test_vflip_mirrors_rows_exactly():
    out, p = run_kernel([RandomVerticalFlip(0.5)])
    flipped = p[:, 1, 0] == 1
    assert 0 < flipped.sum() < N
    np.testing.assert_array_equal(out[flipped], IMAGES[flipped][:, ::-1])
    np.testing.assert_array_equal(out[~flipped], IMAGES[~flipped])


def test_vflip_and_flip_draw_independently_and_make_a_half_turn():
    out, p = run_kernel([make_aug("flip"), make_aug("vflip")])
    h, v = p[:, 1, 0] == 1, p[:, 2, 0] == 1
    assert (h != v).any()
    both = h & v
    assert both.any()
    np.testing.assert_array_equal(out[both], IMAGES[both][:, ::-1, ::-1])


@pytest.mark.parametrize("augs_, atol", [
    ([RandomVerticalFlip(0.5)], 0.0),
    ([make_aug("random_crop"), RandomVerticalFlip(0.5), make_aug("flip"), Cutout(8)], 0.0),
    ([RandomVerticalFlip(0.5), make_aug({"rotate": {"max_degrees": 20}}), make_aug({"grayscale": {"p": 0.5}})], 1e-3),
])
def test_vflip_device_path_equals_loader_path(augs_, atol):
    kernel_out, p = run_kernel(augs_, epoch=2, out_dtype=np.float32)
    device_out = warp(torch.from_numpy(IMAGES).permute(0, 3, 1, 2), p, pack(augs_)).numpy()
    assert np.abs(device_out - kernel_out).max() <= atol * 255


# ---- alt_flip: airbench's alternating flip, an op that sees the epoch ---------

def test_alt_flip_is_registered_with_a_code_from_its_name():
    assert REGISTRY["alt_flip"] is AlternatingFlip and AlternatingFlip.code == code_for("alt_flip")
    assert OPS["alt_flip"].sees_epoch and not any(op.sees_epoch for name, op in OPS.items() if name != "alt_flip")
    assert DataConfig(augment=["alt_flip", {"alt_flip": None}]).augmentations() == [AlternatingFlip()] * 2


def test_alt_flip_alternates_over_epochs_from_one_coin_per_image():
    table = pack([make_aug("random_crop"), make_aug("alt_flip"), make_aug("cutout")])
    indices = np.arange(20_000)
    p = np.stack([draw_params(table, 7, epoch, indices)[:, 2, :2] for epoch in range(4)])  # (epoch, N, [flip, coin])
    flipped, coin = p[..., 0] == 1, p[..., 1] == 1
    assert (coin == coin[0]).all()  # drawn from (seed, index) alone
    np.testing.assert_array_equal(flipped[0], coin[0])  # even epochs: the coin
    for e in range(3):  # each image once mirrored and once not over any two consecutive epochs
        np.testing.assert_array_equal(flipped[e + 1], ~flipped[e])
    assert abs(coin[0].mean() - 0.5) < 0.01
    other_seed = draw_params(table, 8, 0, indices)[:, 2, 1] == 1
    assert abs((other_seed == coin[0]).mean() - 0.5) < 0.02
    # the other ops still draw afresh each epoch
    crops = np.stack([draw_params(table, 7, e, indices)[:, 1, :2] for e in range(2)])
    assert (crops[0] != crops[1]).any(axis=1).mean() > 0.8


def test_alt_flip_mirrors_exactly_and_both_paths_agree():
    table = pack([AlternatingFlip()])
    for epoch in range(4):
        out, p = run_kernel([AlternatingFlip()], epoch=epoch)
        flipped = p[:, 1, 0] == 1
        assert 0 < flipped.sum() < N
        np.testing.assert_array_equal(out[flipped], IMAGES[flipped][:, :, ::-1])
        np.testing.assert_array_equal(out[~flipped], IMAGES[~flipped])
        device_out = warp(torch.from_numpy(IMAGES).permute(0, 3, 1, 2), p, table).numpy()
        np.testing.assert_array_equal(device_out, out.astype(np.float32))
    augs_ = [make_aug("random_crop"), AlternatingFlip(), make_aug({"rotate": {"max_degrees": 10}}), Cutout(8)]
    kernel_out, p = run_kernel(augs_, epoch=3, out_dtype=np.float32)
    device_out = warp(torch.from_numpy(IMAGES).permute(0, 3, 1, 2), p, pack(augs_)).numpy()
    assert np.abs(device_out - kernel_out).max() <= 1e-3 * 255


# ---- brightness_contrast: hiverge/cifar10-speedrun's colour jitter -------------

def test_brightness_contrast_shifts_then_scales_about_its_centre_and_both_paths_agree():
    from fastloader.augs.brightness_contrast import BrightnessContrast

    aug = BrightnessContrast(brightness=20.0, contrast=0.3, centre=(120.0, 110.0, 100.0))
    out, p = run_kernel([aug], out_dtype=np.float32)
    shift, factor = p[:, 1, 1].reshape(-1, 1, 1, 1), p[:, 1, 2].reshape(-1, 1, 1, 1)
    assert (p[:, 1, 0] == 1).all() and np.abs(shift).max() <= 20 and np.abs(factor - 1).max() <= 0.3
    assert np.std(shift) > 5 and np.std(factor) > 0.08  # drawn per image
    centre = np.array([120.0, 110.0, 100.0])
    expected = np.clip(centre + (IMAGES - centre + shift) * factor, 0, 255)
    np.testing.assert_allclose(out, expected, atol=1e-3)
    device_out = warp(torch.from_numpy(IMAGES).permute(0, 3, 1, 2), p, pack([aug])).numpy()
    np.testing.assert_allclose(device_out, out, atol=1e-3)
    mean = pack([make_aug({"brightness_contrast": {"centre": "mean"}})], mean=[125.3, 123.0, 113.9])
    col = settings_layout(BrightnessContrast).centre
    assert mean.settings[0, col:col + 3].tolist() == [125.3, 123.0, 113.9]  # centre: mean is the training mean
    untouched, _ = run_kernel([BrightnessContrast(p=0.0)], out_dtype=np.float32)
    np.testing.assert_array_equal(untouched, IMAGES.astype(np.float32))
    for bad, message in (({"contrast": 1.0}, "contrast must be below 1"), ({"brightness": -1}, "brightness"),
                         ({"p": 2}, "p must be a probability")):
        with pytest.raises(UserError, match=message):
            BrightnessContrast(**bad)
