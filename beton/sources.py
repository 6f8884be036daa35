"""Readers that turn a CIFAR source into per-split uint8 HWC images and int64 labels.

Supported sources: the `cifar-10-batches-py` / `cifar-100-python` folders of the
"python version" and the `.tar.gz` archives they come in (as torchvision
downloads them). Pixels come out byte-identical to the pickles, in file order.
Every malformed input becomes a one-line `UserError` naming the file.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from .errors import UserError
from .paths import DATASETS

ROW_BYTES = 3 * 32 * 32
DOWNLOAD_ORIGIN = "torchvision download"

# file name -> (label for messages, reader of its bytes)
Blobs = dict[str, tuple[str, Callable[[], bytes]]]


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x 32 x 32 x 3, RGB
    labels: np.ndarray  # int64, N


@dataclass(frozen=True)
class Source:
    dataset: str
    classes: list[str]
    splits: dict[str, Split]
    origin: str  # the absolute path read, or DOWNLOAD_ORIGIN


@dataclass(frozen=True)
class Layout:
    """The files of one dataset's "python version" and the keys inside them."""

    dataset: str
    title: str
    folder: str
    tarball: str
    split_files: dict[str, tuple[str, ...]]
    meta: str
    labels_key: str
    names_key: str
    num_classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.split_files["train"], *self.split_files["test"], self.meta)

    def describe(self) -> str:
        return f"a {self.folder} folder ({', '.join(self.files)})"


LAYOUTS = {
    "cifar10": Layout(
        dataset="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        tarball="cifar-10-python.tar.gz",
        split_files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta",
        labels_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": Layout(
        dataset="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        tarball="cifar-100-python.tar.gz",
        split_files={"train": ("train",), "test": ("test",)},
        meta="meta",
        labels_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
}


def read_source(path: str | Path, dataset: str | None = None) -> Source:
    """Reads a folder or tarball; `dataset` (if given) must match what is found.

    A folder that only *contains* a known folder or tarball (e.g. the data
    root) is accepted too, so `--source ./data` does what one expects.
    """
    path = Path(path)
    if dataset is not None:
        check_dataset(dataset)
    if not path.exists():
        raise UserError(f"source not found: {path}")
    if path.is_dir():
        files = {p.name: p for p in path.iterdir() if p.is_file()}
        if not _matching_layouts(files) and (inner := _find_in(path, dataset)) is not None:
            return read_source(inner, dataset)
        blobs = {name: (str(p), p.read_bytes) for name, p in files.items()}
    elif tarfile.is_tarfile(path):
        blobs = _tar_blobs(path)
    else:
        raise UserError(f"{path}: not a CIFAR folder or .tar.gz archive (pass the folder that holds the batch files)")
    layout = _pick_layout(path, blobs, dataset)
    return _parse(layout, blobs, origin=str(path.resolve()))


def find_source(dataset: str, root: str | Path) -> Source:
    """Finds `dataset` under the data root, else downloads it there with torchvision."""
    check_dataset(dataset)
    root = Path(root)
    found = _find_in(root, dataset)
    if found is not None:
        return read_source(found, dataset)
    layout = LAYOUTS[dataset]
    try:
        _download(dataset, root)
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError...
        raise UserError(
            f"no {layout.title} source under {root} and the download failed (no network?); "
            f"pass --source PATH to a {layout.folder} folder or {layout.tarball}"
        ) from e
    source = read_source(root / layout.folder, dataset)
    return Source(source.dataset, source.classes, source.splits, DOWNLOAD_ORIGIN)


def check_dataset(dataset: str) -> None:
    """Raises a UserError naming the choices for an unknown dataset name."""
    if dataset not in LAYOUTS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _find_in(root: Path, dataset: str | None) -> Path | None:
    """The first known folder or tarball in `root` or `root/<dataset>`."""
    for name in [dataset] if dataset else list(LAYOUTS):
        layout = LAYOUTS[name]
        for folder in (root, root / name):
            for candidate in (folder / layout.folder, folder / layout.tarball):
                if candidate.exists():
                    return candidate
    return None


def _download(dataset: str, root: Path) -> None:
    """Lets torchvision fetch and unpack the archive; removes a partial archive on failure."""
    import torchvision.datasets as tvd

    archive = root / LAYOUTS[dataset].tarball
    existed = archive.exists()
    cls = tvd.CIFAR10 if dataset == "cifar10" else tvd.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=True, download=True)
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                archive.unlink()
        raise


def _tar_blobs(path: Path) -> Blobs:
    """Reads the regular files of a tarball into memory in one pass, refusing unsafe members.

    Nothing is extracted to disk; a member that would escape the archive's
    folder, a link or a device file makes the whole archive suspect.
    """
    wanted = {name for layout in LAYOUTS.values() for name in layout.files}
    blobs: Blobs = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                _check_member(path, member)
                name = PurePosixPath(member.name).name
                if member.isfile() and name in wanted:
                    if name in blobs:
                        raise UserError(f"{path}: two members are named {name}; expected one CIFAR folder")
                    data = tar.extractfile(member).read()
                    blobs[name] = (f"{path}:{member.name}", lambda data=data: data)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        raise UserError(f"{path}: truncated or corrupt archive ({e})") from e
    return blobs


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/"):
        problem = "absolute path"
    elif posixpath.normpath(name).split("/")[0] == "..":
        problem = "path escapes the archive folder"
    elif member.issym() or member.islnk():
        problem = "link"
    elif not (member.isfile() or member.isdir()):
        problem = "device or special file"
    else:
        return
    raise UserError(f"{archive}: refusing unsafe archive member {name!r} ({problem})")


def _matching_layouts(names) -> list[str]:
    """Datasets whose files appear among `names`, most complete first."""
    scores = {ds: len(set(lay.files) & set(names)) for ds, lay in LAYOUTS.items()}
    return sorted((ds for ds, n in scores.items() if n), key=lambda ds: -scores[ds])


def _pick_layout(path: Path, blobs: Blobs, dataset: str | None) -> Layout:
    matches = _matching_layouts(blobs)
    if not matches:
        expected = " or ".join(lay.describe() for lay in LAYOUTS.values())
        raise UserError(f"{path}: not a CIFAR source; expected {expected}")
    found = LAYOUTS[matches[0]]
    if dataset is not None and matches[0] != dataset:
        raise UserError(f"{path}: is a {found.title} source, not {LAYOUTS[dataset].title}")
    missing = [name for name in found.files if name not in blobs]
    if missing:
        raise UserError(f"{path}: incomplete {found.folder}: missing {', '.join(missing)}")
    return found


def _parse(layout: Layout, blobs: Blobs, origin: str) -> Source:
    classes = _read_classes(layout, *blobs[layout.meta])
    splits = {
        split: _concat([_read_batch(layout, *blobs[name]) for name in names])
        for split, names in layout.split_files.items()
    }
    for split, data in splits.items():
        if not len(data.labels):
            raise UserError(f"{origin}: the {split} split has no images")
    return Source(layout.dataset, classes, splits, origin)


class _CifarUnpickler(pickle.Unpickler):
    """Loads only what CIFAR pickles hold (dicts, lists, numpy arrays): no arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _load(label: str, read: Callable[[], bytes]) -> dict:
    """Unpickles a Python-2 CIFAR pickle into a dict with str keys."""
    try:
        obj = _CifarUnpickler(io.BytesIO(read()), encoding="latin1").load()
    except OSError as e:
        raise UserError(f"{label}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # pickle raises many types on damaged input
        raise UserError(f"{label}: truncated or corrupt pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise UserError(f"{label}: expected a pickled dict, found {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _key(label: str, batch: dict, key: str):
    if key not in batch:
        raise UserError(f"{label}: missing key {key!r}")
    return batch[key]


def _read_classes(layout: Layout, label: str, read: Callable[[], bytes]) -> list[str]:
    names = _key(label, _load(label, read), layout.names_key)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in names):
        raise UserError(f"{label}: {layout.names_key} is not a list of names")
    if len(names) != layout.num_classes:
        raise UserError(f"{label}: expected {layout.num_classes} {layout.names_key}, found {len(names)}")
    return [_text(n) for n in names]


def _read_batch(layout: Layout, label: str, read: Callable[[], bytes]) -> Split:
    batch = _load(label, read)
    data = _key(label, batch, "data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == ROW_BYTES):
        shape = getattr(data, "shape", type(data).__name__)
        dtype = getattr(data, "dtype", "")
        raise UserError(f"{label}: data has shape {shape} {dtype}, expected N x {ROW_BYTES} uint8 (32x32 RGB planes)")
    labels = _read_labels(layout, label, _key(label, batch, layout.labels_key))
    if len(labels) != len(data):
        raise UserError(f"{label}: {len(labels)} labels for {len(data)} images")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Split(images, labels)


def _read_labels(layout: Layout, label: str, raw) -> np.ndarray:
    labels = np.asarray(raw)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise UserError(f"{label}: {layout.labels_key} must be a flat list of integers")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= layout.num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(
            f"{label}: label {labels[i]} at position {i} is out of range [0, {layout.num_classes})"
        )
    return labels


def _concat(parts: list[Split]) -> Split:
    if len(parts) == 1:
        return parts[0]
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
