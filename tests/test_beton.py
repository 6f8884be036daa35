"""beton: sources -> betons -> manifest, on tiny synthetic CIFAR pickles made here.

The synthetic CIFAR-10 uses bytes keys (as Python 3 reads the original
Python-2 pickles with encoding="bytes"); the CIFAR-100 one uses str keys, so
both spellings are covered.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from beton import UserError, find_source, read_manifest, read_source, verify, write_betons
from beton import sources
from beton import writer
from fastcifar_cli import main

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared/data/cifar-10-batches-py"
TRAIN_PER_BATCH, TEST_COUNT = 20, 30


# ---------------------------------------------------------------- synthetic sources


def _planar(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 -> N x 3072 rows as CIFAR stores them (R plane, G plane, B plane)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _dump(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _random_split(rng, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, num_classes, size=n).astype(np.int64)


def make_cifar10(folder: Path, seed: int = 0) -> dict:
    """A cifar-10-batches-py folder of 5 x 20 train and 30 test images; returns the expected arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    train_images, train_labels = _random_split(rng, 5 * TRAIN_PER_BATCH, 10)
    test_images, test_labels = _random_split(rng, TEST_COUNT, 10)
    for i in range(5):
        part = slice(i * TRAIN_PER_BATCH, (i + 1) * TRAIN_PER_BATCH)
        _dump(folder / f"data_batch_{i + 1}", _cifar10_batch(train_images[part], train_labels[part]))
    _dump(folder / "test_batch", _cifar10_batch(test_images, test_labels))
    _dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072})
    (folder / "readme.html").write_text("<html></html>")
    return {"train": (train_images, train_labels), "test": (test_images, test_labels), "classes": CIFAR10_CLASSES}


def _cifar10_batch(images: np.ndarray, labels: np.ndarray) -> dict:
    return {b"batch_label": b"synthetic", b"labels": labels.tolist(), b"data": _planar(images), b"filenames": []}


def make_cifar100(folder: Path, seed: int = 1) -> dict:
    """A cifar-100-python folder (train 100, test 30 images) with str keys."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    classes = [f"class_{i:03d}" for i in range(100)]
    expected = {"classes": classes}
    for split, n in (("train", 100), ("test", TEST_COUNT)):
        images, labels = _random_split(rng, n, 100)
        coarse = (labels // 5).tolist()
        _dump(folder / split, {"data": _planar(images), "fine_labels": labels.tolist(), "coarse_labels": coarse})
        expected[split] = (images, labels)
    _dump(folder / "meta", {"fine_label_names": classes, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return expected


def make_tarball(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return target


def make_tarball_with(target: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(target, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return target


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("src10")
    expected = make_cifar10(root / "cifar-10-batches-py")
    make_tarball(root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
    return root, expected


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("src100")
    expected = make_cifar100(root / "cifar-100-python")
    make_tarball(root / "cifar-100-python", root / "cifar-100-python.tar.gz")
    return root, expected


@pytest.fixture(scope="module")
def written(cifar10, tmp_path_factory) -> Path:
    """Betons written once from the synthetic CIFAR-10 folder; tests that damage them use a copy."""
    out = tmp_path_factory.mktemp("betons") / "cifar10"
    write_betons(read_source(cifar10[0] / "cifar-10-batches-py"), out, workers=2)
    return out


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch) -> Path:
    """Keeps every default path (./data) inside the test's own folder."""
    root = tmp_path / "data"
    monkeypatch.setenv("FASTCIFAR_DATA", str(root))
    return root


# ---------------------------------------------------------------- helpers


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["beton", *map(str, args)])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_cli_error(capsys, args, *needles: str) -> str:
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def load_beton(path: Path, indices=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (images, labels, indices) of a beton through ffcv's Loader with its default decoders."""
    from ffcv.loader import Loader, OrderOption

    loader = Loader(
        str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False, indices=indices
    )
    batches = [[t.numpy().copy() for t in batch] for batch in loader]  # the loader reuses its buffers
    images, labels, index = (np.concatenate(parts) for parts in zip(*batches))
    return images, labels.ravel(), index.ravel()


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its bytes and mtime, to prove nothing was touched."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def assert_same_split(split: sources.Split, images: np.ndarray, labels: np.ndarray) -> None:
    assert split.images.dtype == np.uint8 and split.images.flags.c_contiguous
    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)


# ---------------------------------------------------------------- reading sources


@pytest.mark.parametrize("name", ["cifar-10-batches-py", "cifar-10-python.tar.gz"])
def test_cifar10_folder_and_tarball_read_lossless_in_order(cifar10, name):
    root, expected = cifar10
    source = read_source(root / name)
    assert source.dataset == "cifar10"
    assert source.classes == CIFAR10_CLASSES
    assert source.origin == str(root / name)
    for split in ("train", "test"):
        assert_same_split(source.splits[split], *expected[split])


@pytest.mark.parametrize("name", ["cifar-100-python", "cifar-100-python.tar.gz"])
def test_cifar100_folder_and_tarball_read_fine_labels(cifar100, name):
    root, expected = cifar100
    source = read_source(root / name, "cifar100")
    assert source.dataset == "cifar100"
    assert source.classes == expected["classes"]
    for split in ("train", "test"):
        assert_same_split(source.splits[split], *expected[split])


def test_reading_a_tarball_writes_nothing(cifar10):
    root, _ = cifar10
    before = snapshot(root)
    read_source(root / "cifar-10-python.tar.gz")
    assert snapshot(root) == before


def test_find_source_looks_under_the_data_root(cifar10, data_root):
    (data_root / "cifar10").mkdir(parents=True)
    shutil.copy(cifar10[0] / "cifar-10-python.tar.gz", data_root / "cifar10")
    source = find_source("cifar10", data_root)
    assert source.origin == str(data_root / "cifar10" / "cifar-10-python.tar.gz")


def test_find_source_reports_a_failed_download(data_root, monkeypatch):
    def offline(dataset, root):
        raise OSError("Name or service not known")

    monkeypatch.setattr(sources, "_download", offline)
    with pytest.raises(UserError, match="no CIFAR-10 source under .* download failed .*--source PATH"):
        find_source("cifar10", data_root)


# ---------------------------------------------------------------- writing and reading back


def test_betons_load_back_equal_to_the_source(written, cifar10):
    from ffcv.reader import Reader

    expected = cifar10[1]
    for split in ("train", "test"):
        assert Reader(str(written / f"{split}.beton")).field_names == ["image", "label", "index"]
        images, labels, index = load_beton(written / f"{split}.beton")
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
        np.testing.assert_array_equal(index, np.arange(len(labels)))
    assert not [p for p in written.iterdir() if p.name.endswith(".tmp")]


def test_manifest_describes_the_betons(written, cifar10):
    root, expected = cifar10
    manifest = read_manifest(written)
    assert manifest["dataset"] == "cifar10"
    assert manifest["classes"] == CIFAR10_CLASSES
    assert manifest["fields"] == ["image", "label", "index"]
    assert manifest["source"] == str(root / "cifar-10-batches-py")
    assert manifest["fastcifar_version"] and manifest["created"]
    for split in ("train", "test"):
        images, labels = expected[split]
        entry = manifest["splits"][split]
        assert entry["count"] == len(labels)
        assert entry["per_class"] == np.bincount(labels, minlength=10).tolist()
        assert entry["sha256"] == hashlib.sha256((written / entry["file"]).read_bytes()).hexdigest()
    pixels = expected["train"][0].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(manifest["mean"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(manifest["std"], pixels.std(axis=0), rtol=1e-12)
    checks = [(c.file, c.ok, c.actual) for c in verify(written)]
    assert checks == [(f"{s}.beton", True, manifest["splits"][s]["sha256"]) for s in ("train", "test")]


def test_default_write_is_byte_reproducible(cifar10, tmp_path):
    source = read_source(cifar10[0] / "cifar-10-python.tar.gz")
    first = write_betons(source, tmp_path / "a")
    second = write_betons(source, tmp_path / "b")
    for split in ("train", "test"):
        assert first["splits"][split]["sha256"] == second["splits"][split]["sha256"]


def test_cli_write_uses_the_data_root_and_reports(cifar100, data_root, capsys):
    shutil.copytree(cifar100[0] / "cifar-100-python", data_root / "cifar-100-python")
    code, out, _ = cli(capsys, "write", "--dataset", "cifar100", "--workers", 1)
    assert code == 0
    assert f"wrote {data_root / 'cifar100' / 'train.beton'}: 100 images" in out
    assert f"wrote {data_root / 'cifar100' / 'test.beton'}: 30 images" in out
    assert "done in" in out
    assert read_manifest(data_root / "cifar100")["splits"]["train"]["count"] == 100


def test_existing_output_is_refused_without_force_and_left_untouched(written, cifar10, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(written, out)
    before = snapshot(out)
    source = cifar10[0] / "cifar-10-batches-py"
    assert_cli_error(capsys, ["write", "--source", source, "--out", out], "exist", "pass --force to overwrite")
    assert_cli_error(capsys, ["write", "--source", tmp_path / "absent", "--out", out], "pass --force")  # checked first
    assert snapshot(out) == before

    code, _, _ = cli(capsys, "write", "--source", source, "--out", out, "--force", "--workers", 1)
    assert code == 0
    assert read_manifest(out)["created"] >= read_manifest(written)["created"]
    assert all(check.ok for check in verify(out))


def test_interrupted_overwrite_leaves_old_betons_flagged_incomplete(written, cifar10, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(written, out)
    old_train = (out / "train.beton").read_bytes()

    def fail(path, split, workers):
        path.write_bytes(b"partial")
        raise UserError("cannot write: disk on fire")

    monkeypatch.setattr(writer, "_write_beton", fail)
    with pytest.raises(UserError, match="disk on fire"):
        write_betons(read_source(cifar10[0] / "cifar-10-batches-py"), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["test.beton", "train.beton"]
    assert (out / "train.beton").read_bytes() == old_train
    assert_cli_error(capsys, ["inspect", out], "incomplete", "has betons but no manifest.json", "--force")


def test_write_under_a_regular_file_fails_cleanly(cifar10, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    source = cifar10[0] / "cifar-10-batches-py"
    assert_cli_error(capsys, ["write", "--source", source, "--out", blocker / "sub"], "cannot create", "a_file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_write_into_a_read_only_folder_fails_cleanly(cifar10, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert_cli_error(capsys, ["write", "--source", cifar10[0] / "cifar-10-batches-py", "--out", out], "cannot write")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


# ---------------------------------------------------------------- inspect


def test_inspect_reports_counts_stats_and_ok(written, capsys):
    code, out, _ = cli(capsys, "inspect", written)
    assert code == 0
    assert "cifar10 (10 classes)" in out
    assert "train.beton  sha256 OK" in out and "test.beton   sha256 OK" in out
    assert "airplane" in out and "mean:" in out and "std:" in out


def test_inspect_json(written, capsys):
    code, out, _ = cli(capsys, "inspect", written, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["manifest"] == read_manifest(written)
    assert [c["ok"] for c in report["checks"]] == [True, True]


def test_inspect_detects_a_flipped_byte(written, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(written, copy)
    data = bytearray((copy / "train.beton").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "train.beton").write_bytes(bytes(data))
    assert [c.ok for c in verify(copy)] == [False, True]
    assert_cli_error(capsys, ["inspect", copy], "sha256 mismatch for train.beton")
    code, out, _ = cli(capsys, "inspect", written)
    assert code == 0


def test_inspect_detects_a_missing_beton(written, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(written, copy)
    (copy / "test.beton").unlink()
    assert_cli_error(capsys, ["inspect", copy], "missing test.beton")


@pytest.mark.parametrize(
    "content, needle",
    [("{not json", "invalid JSON"), ('{"format_version": 1}', "missing key 'dataset'"), ("[]", "not a JSON object")],
)
def test_inspect_rejects_a_broken_manifest(written, tmp_path, capsys, content, needle):
    copy = tmp_path / "copy"
    shutil.copytree(written, copy)
    (copy / "manifest.json").write_text(content)
    assert_cli_error(capsys, ["inspect", copy], "manifest.json", needle)


def test_inspect_of_a_missing_folder(tmp_path, capsys):
    assert_cli_error(capsys, ["inspect", tmp_path / "nowhere"], "no beton folder", "nowhere")


# ---------------------------------------------------------------- bad inputs


def _break_batch(folder: Path, name: str, key: bytes, value) -> None:
    batch = pickle.loads((folder / name).read_bytes())
    batch[key] = value
    _dump(folder / name, batch)


def _bad_layout(src: Path) -> tuple[Path, tuple[str, ...]]:
    (src / "data_batch_3").unlink()
    (src / "batches.meta").unlink()
    return src, ("incomplete cifar-10-batches-py", "missing data_batch_3, batches.meta")


def _not_cifar(src: Path) -> tuple[Path, tuple[str, ...]]:
    empty = src.parent / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    return empty, ("not a CIFAR source", "data_batch_1")


def _truncated(src: Path) -> tuple[Path, tuple[str, ...]]:
    data = (src / "data_batch_2").read_bytes()
    (src / "data_batch_2").write_bytes(data[: len(data) // 2])
    return src, ("data_batch_2", "truncated or corrupt pickle")


def _label_out_of_range(src: Path) -> tuple[Path, tuple[str, ...]]:
    labels = [0] * TRAIN_PER_BATCH
    labels[7] = 10
    _break_batch(src, "data_batch_4", b"labels", labels)
    return src, ("data_batch_4", "label 10 at position 7 is out of range [0, 10)")


def _wrong_shape(src: Path) -> tuple[Path, tuple[str, ...]]:
    _break_batch(src, "test_batch", b"data", np.zeros((TEST_COUNT, 3, 32, 32), np.uint8))
    return src, ("test_batch", "data has shape (30, 3, 32, 32)", "expected N x 3072 uint8")


def _count_mismatch(src: Path) -> tuple[Path, tuple[str, ...]]:
    _break_batch(src, "data_batch_1", b"labels", [1] * (TRAIN_PER_BATCH - 1))
    return src, ("data_batch_1", "19 labels for 20 images")


def _missing_key(src: Path) -> tuple[Path, tuple[str, ...]]:
    batch = pickle.loads((src / "data_batch_5").read_bytes())
    del batch[b"data"]
    _dump(src / "data_batch_5", batch)
    return src, ("data_batch_5", "missing key 'data'")


def _not_a_pickle_of_cifar(src: Path) -> tuple[Path, tuple[str, ...]]:
    _dump(src / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"x": tarfile.TarInfo})
    return src, ("batches.meta", "truncated or corrupt pickle", "unexpected object tarfile.TarInfo")


def _evil_member(src: Path) -> tuple[Path, tuple[str, ...]]:
    member = tarfile.TarInfo("../evil")
    member.size = 4
    return make_tarball_with(src.parent / "evil.tar.gz", member, b"evil"), ("refusing unsafe archive member '../evil'",)


def _symlink_member(src: Path) -> tuple[Path, tuple[str, ...]]:
    member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return make_tarball_with(src.parent / "link.tar.gz", member), ("'cifar-10-batches-py/data_batch_1'", "(link)")


def _absolute_member(src: Path) -> tuple[Path, tuple[str, ...]]:
    member = tarfile.TarInfo("/tmp/evil")
    return make_tarball_with(src.parent / "abs.tar.gz", member), ("'/tmp/evil'", "absolute path")


def _device_member(src: Path) -> tuple[Path, tuple[str, ...]]:
    member = tarfile.TarInfo("cifar-10-batches-py/null")
    member.type = tarfile.CHRTYPE
    return make_tarball_with(src.parent / "dev.tar.gz", member), ("device or special file",)


def _truncated_tarball(src: Path) -> tuple[Path, tuple[str, ...]]:
    tarball = make_tarball(src, src.parent / "cut.tar.gz")
    data = tarball.read_bytes()
    tarball.write_bytes(data[: len(data) // 2])
    return tarball, ("cut.tar.gz", "truncated or corrupt archive")


def _missing_path(src: Path) -> tuple[Path, tuple[str, ...]]:
    return src.parent / "no-such-folder", ("source not found", "no-such-folder")


BAD_SOURCES = [
    _missing_path,
    _bad_layout,
    _not_cifar,
    _truncated,
    _label_out_of_range,
    _wrong_shape,
    _count_mismatch,
    _missing_key,
    _not_a_pickle_of_cifar,
    _evil_member,
    _symlink_member,
    _absolute_member,
    _device_member,
    _truncated_tarball,
]


@pytest.mark.parametrize("damage", BAD_SOURCES, ids=lambda f: f.__name__.strip("_"))
def test_bad_source_is_a_one_line_user_error(damage, tmp_path, capsys):
    src = tmp_path / "cifar-10-batches-py"
    make_cifar10(src)
    path, needles = damage(src)
    with pytest.raises(UserError) as error:
        read_source(path)
    for needle in needles:
        assert needle in str(error.value)
    out = tmp_path / "out"
    assert_cli_error(capsys, ["write", "--source", path, "--out", out], *needles)
    assert not out.exists()
    assert not (tmp_path / "evil").exists()


def test_dataset_must_match_the_source(cifar10, capsys):
    assert_cli_error(
        capsys, ["write", "--dataset", "cifar100", "--source", cifar10[0] / "cifar-10-batches-py"],
        "is a CIFAR-10 source, not CIFAR-100",
    )


@pytest.mark.parametrize("args, needle", [(["--dataset", "cifar11"], "unknown dataset 'cifar11'"), (["--workers", "0"], "--workers")])
def test_bad_options_are_one_line_errors(capsys, args, needle):
    assert_cli_error(capsys, ["write", *args], needle)


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_CIFAR10.is_dir(), reason=f"{REAL_CIFAR10} is absent")
def test_real_cifar10_betons(tmp_path):
    source = read_source(REAL_CIFAR10)
    manifest = write_betons(source, tmp_path / "cifar10")
    assert manifest["classes"] == CIFAR10_CLASSES
    assert manifest["splits"]["train"]["count"] == 50000 and manifest["splits"]["test"]["count"] == 10000
    assert manifest["splits"]["train"]["per_class"] == [5000] * 10
    assert manifest["splits"]["test"]["per_class"] == [1000] * 10
    with open(REAL_CIFAR10 / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images, labels, index = load_beton(tmp_path / "cifar10" / "test.beton", indices=[0, 9999])
    for row, i in enumerate((0, 9999)):
        planes = batch[b"data"][i].reshape(3, 32, 32)
        np.testing.assert_array_equal(images[row], planes.transpose(1, 2, 0))
        assert labels[row] == batch[b"labels"][i] and index[row] == i
