"""FFCV loaders: the batch contract, lossless test split, reproducibility, errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from beton.errors import UserError
from fastloader.bench import BENCH_AUGMENT
from fastloader.config import DataConfig, parse
from fastloader.loaders import build_loader, build_loaders, read_split
from fastcifar_cli import main
from tests.fastloader_fixtures import N_TEST, N_TRAIN


def denormalise(images: torch.Tensor, manifest: dict) -> np.ndarray:
    mean = torch.tensor(manifest["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(manifest["std"]).view(1, 3, 1, 1)
    return torch.round(images.float() * std + mean).permute(0, 2, 3, 1).numpy()


def manifest_of(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_batch_contract(loaders):
    train, test = loaders
    images, labels = next(iter(train))
    assert images.shape == (128, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (128,) and labels.dtype == torch.int64
    assert images.device == labels.device == torch.device("cpu")
    assert len(train) == N_TRAIN // 128 and len(test) == -(-N_TEST // 128)


def test_test_split_is_lossless_and_in_order(loaders, beton_dir, synthetic_source):
    _, test = loaders
    manifest = manifest_of(beton_dir)
    got, labels, indices = zip(*((denormalise(x, manifest), y.clone(), i.clone()) for x, y, i in test.batches()))
    np.testing.assert_array_equal(np.concatenate(got), synthetic_source.splits["test"].images)
    np.testing.assert_array_equal(torch.cat(labels).numpy(), synthetic_source.splits["test"].labels)
    np.testing.assert_array_equal(torch.cat(indices).numpy(), np.arange(N_TEST))


def test_normalised_with_manifest_stats(loaders, beton_dir, synthetic_source):
    _, test = loaders
    images, _ = next(iter(test))
    manifest = manifest_of(beton_dir)
    src = torch.from_numpy(synthetic_source.splits["test"].images[:len(images)]).permute(0, 3, 1, 2).double()
    expected = (src - torch.tensor(manifest["mean"]).view(1, 3, 1, 1)) / torch.tensor(manifest["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(images.double(), expected, atol=1e-5, rtol=0)


def test_epochs_differ_and_set_epoch_replays(loaders):
    train, _ = loaders
    train.set_epoch(0)
    first = [(x.clone(), i.clone()) for x, _, i in train.batches()]
    second = [(x.clone(), i.clone()) for x, _, i in train.batches()]
    assert not torch.equal(first[0][1], second[0][1])  # new order each epoch
    train.set_epoch(0)
    replay = [(x.clone(), i.clone()) for x, _, i in train.batches()]
    for (a, ia), (b, ib) in zip(first, replay):
        assert torch.equal(ia, ib) and torch.equal(a, b)


def test_an_epoch_left_early_leaves_no_loader_thread_running(beton_dir):
    """Leaving an epoch early (a benchmark's few steps, a stop request) waits for FFCV's thread: a process
    that exited while it was still inside a numba kernel aborted."""
    from ffcv.loader.epoch_iterator import EpochIterator

    cfg = DataConfig(beton_dir=str(beton_dir), augment=BENCH_AUGMENT, batch_size=8, workers=2, seed=7,
                     batches_ahead=3)
    train = build_loader(cfg, "train")
    assert len(train) > 6  # more batches than the thread prepares ahead
    for taken in (1, len(train) - 2, len(train)):  # ... and left with every remaining batch prepared
        begin = time.monotonic()
        for i, _ in enumerate(train):
            if i + 1 == taken:
                break
        assert [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()] == []
        assert time.monotonic() - begin < 10


def test_same_seed_same_batches_with_other_worker_count(loaders, beton_dir):
    train, _ = loaders
    cfg = DataConfig(beton_dir=str(beton_dir), augment=BENCH_AUGMENT, batch_size=128, workers=1, seed=7)
    one_worker = build_loader(cfg, "train")
    train.set_epoch(3)
    one_worker.set_epoch(3)
    for (a, ya), (b, yb) in zip(train, one_worker):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_training_images_are_augmented_and_sane(loaders, beton_dir):
    train, _ = loaders
    manifest = manifest_of(beton_dir)
    x, _, idx = next(train.batches())
    pixels = denormalise(x, manifest)
    assert pixels.min() >= 0 and pixels.max() <= 255
    # a 16x16 cutout of zeros in every image
    assert ((pixels == 0).all(axis=-1).sum(axis=(1, 2)) >= 256).all()


def test_device_path_gives_same_batches_as_loader_path(beton_dir):
    base = dict(beton_dir=str(beton_dir), augment=BENCH_AUGMENT, batch_size=128, workers=2, seed=5)
    loader_path = build_loader(DataConfig(**base), "train")
    device_path = build_loader(DataConfig(**base, augment_where="device"), "train")
    (a, ya), (b, yb) = next(iter(loader_path)), next(iter(device_path))
    assert torch.equal(ya, yb)
    assert b.is_contiguous(memory_format=torch.channels_last) and b.dtype == torch.float32
    # rotation: the two paths agree within float rounding (normalised units)
    assert (a - b).abs().max().item() < 1e-3


def test_subset_and_compute_dtype(beton_dir):
    cfg = DataConfig(beton_dir=str(beton_dir), batch_size=100, subset=300, test_subset=50, workers=2)
    train = build_loader(cfg, "train", dtype=torch.bfloat16)
    seen = torch.cat([i.clone() for _, _, i in train.batches()])
    assert train.num_samples == 300 and sorted(seen.tolist()) == list(range(300))
    x, _ = next(iter(train))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_read_split_matches_source(beton_dir, synthetic_source):
    images, labels = read_split(beton_dir, "train")
    np.testing.assert_array_equal(images, synthetic_source.splits["train"].images)
    np.testing.assert_array_equal(labels, synthetic_source.splits["train"].labels)


@pytest.mark.realdata
def test_real_cifar10_test_split_is_lossless(real_cifar10, tmp_path):
    import pickle

    from beton.sources import read_source
    from beton.writer import write_betons

    write_betons(read_source(real_cifar10), tmp_path / "c10")
    test = build_loader(DataConfig(beton_dir=str(tmp_path / "c10"), test_batch_size=1000), "test")
    got = np.concatenate([denormalise(x, manifest_of(tmp_path / "c10")) for x, _ in test])
    with open(real_cifar10 / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    expected = raw[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, expected)


# ---- bad inputs -------------------------------------------------------------

def test_missing_folder_and_manifest(tmp_path, beton_dir):
    with pytest.raises(UserError):
        build_loaders(DataConfig(beton_dir=str(tmp_path / "nope")))
    partial = tmp_path / "partial"
    shutil.copytree(beton_dir, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(UserError, match="incomplete"):
        build_loaders(DataConfig(beton_dir=str(partial)))


def test_truncated_beton_is_a_clear_error(tmp_path, beton_dir):
    broken = tmp_path / "broken"
    shutil.copytree(beton_dir, broken)
    data = (broken / "train.beton").read_bytes()
    (broken / "train.beton").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        build_loaders(DataConfig(beton_dir=str(broken)))


@pytest.mark.parametrize("data, message", [
    ({"bach_size": 3}, "unknown key"),
    ({"batch_size": "big"}, "expected an integer"),
    ({"batch_size": 0}, "at least 1"),
    ({"order": "shuffled"}, "expected 'random'"),
    ({"augment_where": "gpu"}, "expected 'loader'"),
    ({"augment": "flip"}, "expected a list"),
])
def test_bad_data_config(data, message):
    with pytest.raises(UserError, match=message):
        parse(DataConfig, data, "data")


def test_bench_cli_bad_path_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "loader", "--beton", str(tmp_path / "missing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_bench_loader_json_has_every_key(beton_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "loader", "--beton", str(beton_dir), "--batches", "2", "--json"])
    assert exc.value.code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("fastcifar_loader", "fastcifar_device", "fastcifar_test", "torchvision", "albumentations",
                "ffcv_builtin"):
        assert result[key] > 0, key


ONE_CORE = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # as `taskset -c 0` or a 1-CPU container would
from fastloader.loaders import read_split
import numba
images, labels = read_split(sys.argv[1], "test", workers=2)
images_all_cores, _ = read_split(sys.argv[1], "test")  # workers=None: FFCV would ask for os.cpu_count()
print(numba.config.NUMBA_NUM_THREADS, len(labels), (images == images_all_cores).all())
"""


def test_a_loader_asking_for_more_workers_than_the_process_may_use_runs_on_what_it_may(beton_dir):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", ONE_CORE, str(beton_dir)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", str(N_TEST), "True"]


def test_importing_ffcv_leaves_its_numba_compile_on_disk_for_the_next_process(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "import fastloader.loaders"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = {p.name.split("-")[0] for p in tmp_path.rglob("typeddict.*.nbi")}
    assert {"typeddict._make_dict", "typeddict._setitem"} <= kept


def test_a_second_loader_reuses_the_compiled_pipeline_and_gives_the_same_batches(beton_dir, monkeypatch):
    """FFCV compiles every pipeline function again for each Loader (0.7 s a loader on 2 cores); fastloader.compiled
    hands the second loader the first one's compiled functions, and its batches are the same."""
    from fastloader import compiled

    cfg = DataConfig(beton_dir=str(beton_dir), batch_size=64, workers=1, seed=3, augment=["flip"])
    first = [(x.clone(), y.clone()) for x, y in build_loader(cfg, "train")]
    assert len(compiled._CACHE) >= 3  # the image and label decoders and the memory reader at least
    compiles = []
    monkeypatch.setattr(compiled, "_ORIGINAL", lambda *args: compiles.append(args))
    second = [(x.clone(), y.clone()) for x, y in build_loader(cfg, "train")]
    assert compiles == []  # nothing compiled again
    assert len(first) == len(second) > 1
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, second))


def test_compiled_functions_are_shared_only_where_their_code_and_closure_are_the_same():
    import numba
    from ffcv.pipeline.compiler import Compiler

    def adding(k):
        def add(x):
            return x + k
        return add

    def reading(values):
        def read(i):
            return values[i]
        return read

    one, two, one_again = Compiler.compile(adding(1)), Compiler.compile(adding(2)), Compiler.compile(adding(1))
    assert one(1) == 2 and two(1) == 3 and one_again is one
    a, b = np.array([1.0, 2.0]), np.array([1.0, 2.0])  # equal, but numba freezes each one: never shared
    read_a, read_b = Compiler.compile(reading(a)), Compiler.compile(reading(b))
    assert read_a is not read_b and read_a is Compiler.compile(reading(a))
    assert Compiler.compile(adding(1), numba.float64(numba.float64)) is not one  # another signature
