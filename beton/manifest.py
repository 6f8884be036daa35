"""manifest.json: what a beton folder holds, written last so its absence means "incomplete".

Keys (format_version 1):
  format_version, dataset, classes (names, index = label),
  fields (beton field names, in order),
  splits: {split: {file, count, per_class (list aligned with classes), sha256}},
  mean, std: per-channel (R, G, B) of the train split on the 0-255 scale
             (population std, ddof=0),
  source, fastcifar_version, created (UTC, ISO 8601).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .atomic import atomic_write_text
from .errors import UserError
from .schema import IMAGE, INDEX, LABEL, MANIFEST, SPLITS, beton_name
from .sources import Source

FORMAT_VERSION = 1
REWRITE_HINT = "run `fastcifar beton write --force`"


class FileCheck(NamedTuple):
    file: str
    ok: bool
    expected: str
    actual: str | None  # None when the file is missing


def build_manifest(source: Source, sha256: dict[str, str], sizes: dict[str, int]) -> dict:
    """The manifest of betons written from `source`; `sha256` and `sizes` map split -> digest, bytes.

    The size lets a loader refuse a truncated file cheaply (FFCV memory-maps
    the beton, and reading past a truncated end would crash the process).
    """
    num_classes = len(source.classes)
    mean, std = channel_stats(source.splits["train"].images)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": source.dataset,
        "classes": list(source.classes),
        "fields": [IMAGE, LABEL, INDEX],
        "splits": {
            split: {
                "file": beton_name(split),
                "count": int(len(data.labels)),
                "per_class": np.bincount(data.labels, minlength=num_classes).tolist(),
                "sha256": sha256[split],
                "bytes": int(sizes[split]),
            }
            for split, data in source.splits.items()
        },
        "mean": mean,
        "std": std,
        "source": source.origin,
        "fastcifar_version": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 N x H x W x 3 images.

    Counted exactly from 256-bin histograms, so the result does not depend on
    summation order and needs no float copy of the whole split.
    """
    levels = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(images.shape[-1]):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        n = hist.sum()
        mu = float(hist @ levels / n)
        mean.append(mu)
        std.append(float(np.sqrt(hist @ (levels - mu) ** 2 / n)))
    return mean, std


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    target = Path(out_dir) / MANIFEST
    atomic_write_text(target, json.dumps(manifest, indent=2) + "\n")
    return target


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a beton folder, or a UserError saying what is wrong and what to run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"no beton folder at {folder}; run `fastcifar beton write` first")
    path = folder / MANIFEST
    if not path.exists():
        if any((folder / beton_name(s)).exists() for s in SPLITS):
            raise UserError(
                f"incomplete: {folder} has betons but no {MANIFEST} (the write did not finish); {REWRITE_HINT}"
            )
        raise UserError(f"no {MANIFEST} in {folder}; run `fastcifar beton write` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e}); {REWRITE_HINT}") from e
    _validate(path, manifest)
    return manifest


def _count(value) -> bool:
    """A non-negative integer (JSON has no separate bool, but Python's True is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _validate(path: Path, manifest) -> None:
    """Checks the keys readers rely on, and their types, so they never fail later with a
    KeyError, or a TypeError/ValueError while printing or opening what the manifest names."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"{path}: {what}; {REWRITE_HINT}")

    need(isinstance(manifest, dict), "not a JSON object")
    for key in ("format_version", "dataset", "classes", "splits", "mean", "std"):
        need(key in manifest, f"missing key {key!r}")
    need(manifest["format_version"] == FORMAT_VERSION, f"unsupported format_version {manifest['format_version']!r}")
    classes = manifest["classes"]
    need(isinstance(classes, list) and all(isinstance(c, str) for c in classes), "'classes' is not a list of names")
    need(len(classes) > 0, "'classes' is empty")
    for key in ("mean", "std"):
        value = manifest[key]
        need(
            isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value),
            f"{key!r} is not a list of 3 numbers",
        )
    need(isinstance(manifest["splits"], dict), "'splits' is not an object")
    for split in SPLITS:
        entry = manifest["splits"].get(split)
        need(isinstance(entry, dict), f"missing key 'splits.{split}'")
        for key in ("file", "count", "per_class", "sha256"):
            need(key in entry, f"missing key 'splits.{split}.{key}'")
        for key in ("file", "sha256"):
            need(isinstance(entry[key], str) and entry[key], f"'splits.{split}.{key}' is not a non-empty string")
        for key in ("count", "bytes"):
            need(key not in entry or _count(entry[key]), f"'splits.{split}.{key}' is not a non-negative integer")
        need(
            isinstance(entry["per_class"], list) and len(entry["per_class"]) == len(classes),
            f"'splits.{split}.per_class' does not have one count per class",
        )
        need(all(map(_count, entry["per_class"])), f"'splits.{split}.per_class' is not a list of non-negative integers")


_VERIFIED: set[tuple] = set()  # (path, size, mtime) of betons whose sha256 matched: a process hashes each once


def check_beton(folder: str | Path, manifest: dict, split: str) -> Path:
    """The path of `split`'s beton, after its size and sha256 match the manifest: FFCV reads a damaged
    beton's header and offsets without checks, so corrupt bytes could crash the reader or feed garbage."""
    folder = Path(folder)
    entry = manifest["splits"][split]
    path = folder / beton_name(split)  # not entry["file"]: a manifest must not point outside its folder
    if not path.is_file():
        raise UserError(f"missing {path}; write it with `fastcifar beton write`")
    stat = path.stat()
    expected = entry.get("bytes")
    if expected is not None and stat.st_size != expected:
        raise UserError(f"{path} is truncated or changed ({stat.st_size} bytes, manifest says "
                        f"{expected}); check it with `fastcifar beton inspect {folder}`")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        if sha256_file(path) != entry["sha256"]:
            raise UserError(f"{path} is corrupt or was changed (its sha256 differs from the manifest's); "
                            f"write it again with `fastcifar beton write`")
        _VERIFIED.add(key)
    return path


def verify(folder: str | Path, manifest: dict | None = None) -> list[FileCheck]:
    """sha256 of each beton against the manifest; a missing file fails with actual=None."""
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    checks = []
    for entry in manifest["splits"].values():
        path = folder / entry["file"]
        try:
            actual = sha256_file(path) if path.is_file() else None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from e
        checks.append(FileCheck(entry["file"], actual == entry["sha256"], entry["sha256"], actual))
    return checks


def _version() -> str:
    try:
        return metadata.version("fastcifar")
    except metadata.PackageNotFoundError:
        return "0+unknown"
