"""Writes a `Source` as `train.beton`, `test.beton` and, last, `manifest.json`.

Images are stored raw (uint8 RGB), so the beton is lossless and decoding is a
copy. Betons are written under temporary names and renamed only when both
are complete; the manifest goes last, so betons without one are known to be
an unfinished write.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from .atomic import atomic_path
from .errors import UserError
from .manifest import build_manifest, sha256_file, write_manifest
from .numba_cache import cache_ffcv_import
from .schema import IMAGE, INDEX, LABEL, MANIFEST, SPLITS, beton_name
from .sources import Source, Split

PAGE_SIZE = 8 << 20  # ffcv's default page size
SAMPLE_OVERHEAD = 64  # per-sample metadata and allocation-table bytes, rounded up


class _Samples:
    """One split as the indexable (image, label, index) dataset DatasetWriter reads; no torch needed."""

    def __init__(self, split: Split):
        self.images = split.images
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        return self.images[i], int(self.labels[i]), i


def write_betons(source: Source, out_dir: str | Path, force: bool = False, workers: int | None = None) -> dict:
    """Writes both betons and the manifest into `out_dir`; returns the manifest.

    Without `force`, refuses (touching nothing) if any output already exists.
    With `force`, the old manifest is removed first, so an interrupted
    overwrite is recognisable as incomplete. One worker (the default) makes
    the files byte-identical from run to run; with more, ffcv's page order
    varies (same samples, different sha256), and on CIFAR it is no faster.
    """
    out_dir = Path(out_dir)
    workers = workers or 1
    refuse_existing(out_dir, force)
    _make_dir(out_dir)
    _check_space(out_dir, source, workers)
    if force:
        _remove(out_dir / MANIFEST)
    sha256, sizes = {}, {}
    with contextlib.ExitStack() as renames:
        for split in SPLITS:
            tmp = renames.enter_context(atomic_path(out_dir / beton_name(split)))
            _write_beton(tmp, source.splits[split], workers)
            sha256[split] = sha256_file(tmp)
            sizes[split] = tmp.stat().st_size
    manifest = build_manifest(source, sha256, sizes)
    write_manifest(out_dir, manifest)
    return manifest


def _write_beton(path: Path, split: Split, workers: int) -> None:
    cache_ffcv_import()
    from ffcv.fields import IntField, RGBImageField  # ffcv pulls in torch: import only when writing
    from ffcv.writer import DatasetWriter

    fields = {IMAGE: RGBImageField(write_mode="raw"), LABEL: IntField(), INDEX: IntField()}
    writer = DatasetWriter(str(path), fields, page_size=PAGE_SIZE, num_workers=workers)
    writer.from_indexed_dataset(_Samples(split))


def refuse_existing(out_dir: str | Path, force: bool) -> None:
    """Raises unless `force` when `out_dir` already holds any output; lets callers fail before slow work."""
    out_dir = Path(out_dir)
    existing = [name for name in (*map(beton_name, SPLITS), MANIFEST) if (out_dir / name).exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise UserError(f"{out_dir}: {', '.join(existing)} {verb}; pass --force to overwrite")


def _make_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror or e}") from e


def _check_space(out_dir: Path, source: Source, workers: int) -> None:
    """Fails early on a full disk: ffcv's writer hangs if a worker dies mid-write."""
    needed = sum(
        data.images[0].nbytes * len(data.images) + SAMPLE_OVERHEAD * len(data.images) + (workers + 1) * PAGE_SIZE
        for data in source.splits.values()
    )
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise UserError(f"not enough space in {out_dir}: need about {needed >> 20} MiB, {free >> 20} MiB free")


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot remove {path}: {e.strerror or e}") from e
