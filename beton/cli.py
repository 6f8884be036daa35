"""`fastcifar beton write|inspect`: make betons from a CIFAR source and check them."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError
from .manifest import FileCheck, read_manifest, verify
from .paths import data_root, dataset_dir
from .schema import MANIFEST
from .sources import LAYOUTS, check_dataset, find_source, read_source
from .writer import refuse_existing, write_betons

app = typer.Typer(
    help="Write CIFAR betons (lossless raw RGB) with a manifest, and check them.\n\n"
    "Example: fastcifar beton write --source ../shared/data/cifar-10-batches-py",
    no_args_is_help=True,
)


@app.command()
def write(
    dataset: Annotated[
        Optional[str],
        typer.Option(help="cifar10 or cifar100 (default: what --source holds, else cifar10)."),
    ] = None,
    source: Annotated[
        Optional[Path],
        typer.Option(
            help="A cifar-10-batches-py / cifar-100-python folder or its .tar.gz. "
            "Default: look under the data root ($FASTCIFAR_DATA or ./data), else download."
        ),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <data root>/<dataset>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing betons and manifest.")] = False,
    workers: Annotated[
        Optional[int],
        typer.Option(help="Writer processes (default 1: byte-identical files on every run)."),
    ] = None,
) -> None:
    """Write train.beton, test.beton and manifest.json from a CIFAR source.

    Example: fastcifar beton write --source ../shared/data/cifar-10-batches-py
    """
    start = time.perf_counter()
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if dataset is not None:
        check_dataset(dataset)
    known = dataset or (None if source else "cifar10")
    if out or known:  # refuse before reading or downloading anything
        refuse_existing(out or dataset_dir(known), force)
    src = read_source(source, dataset) if source else find_source(known, data_root())
    out_dir = out if out else dataset_dir(src.dataset)
    counts = ", ".join(f"{split} {len(data.labels):,}" for split, data in src.splits.items())
    typer.echo(f"read {LAYOUTS[src.dataset].title} from {src.origin}: {counts} images ({time.perf_counter() - start:.1f} s)")
    manifest = write_betons(src, out_dir, force=force, workers=workers)
    for entry in manifest["splits"].values():
        path = out_dir / entry["file"]
        typer.echo(f"wrote {path}: {entry['count']:,} images, {path.stat().st_size / 2**20:.1f} MiB")
    typer.echo(f"wrote {out_dir / MANIFEST}: mean {_triple(manifest['mean'])}, std {_triple(manifest['std'])}")
    typer.echo(f"done in {time.perf_counter() - start:.1f} s")


@app.command()
def inspect(
    folder: Annotated[Optional[Path], typer.Argument(help="Beton folder (default: <data root>/cifar10).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest and the checks as JSON.")] = False,
) -> None:
    """Show a beton folder's manifest and check each beton's sha256 (exit 2 on a mismatch).

    Example: fastcifar beton inspect data/cifar10
    """
    folder = folder if folder else dataset_dir("cifar10")
    manifest = read_manifest(folder)
    checks = verify(folder, manifest)
    if as_json:
        typer.echo(json.dumps({"manifest": manifest, "checks": [c._asdict() for c in checks]}, indent=2))
    else:
        _print_summary(folder, manifest, checks)
    problems = [_problem(c) for c in checks if not c.ok]
    if problems:
        raise UserError(f"{'; '.join(problems)} (in {folder}); run `fastcifar beton write --force`")


def _print_summary(folder: Path, manifest: dict, checks: list[FileCheck]) -> None:
    splits = manifest["splits"]
    classes = manifest["classes"]
    typer.echo(f"folder:   {folder}")
    typer.echo(f"dataset:  {manifest['dataset']} ({len(classes)} classes)")
    typer.echo(f"source:   {manifest.get('source', '?')}")
    typer.echo(f"created:  {manifest.get('created', '?')} by fastcifar {manifest.get('fastcifar_version', '?')}")
    typer.echo(f"mean:     {_triple(manifest['mean'])}  (train, RGB, 0-255)")
    typer.echo(f"std:      {_triple(manifest['std'])}")
    typer.echo("")
    for check, (split, entry) in zip(checks, splits.items()):
        status = "OK" if check.ok else ("MISSING" if check.actual is None else "MISMATCH")
        typer.echo(f"{split:<6} {entry['count']:>7,} images  {entry['file']:<12} sha256 {status}")
    typer.echo("")
    width = max(len(c) for c in classes)
    typer.echo(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits))
    for i, name in enumerate(classes):
        typer.echo(f"{name:<{width}}  " + "  ".join(f"{entry['per_class'][i]:>6,}" for entry in splits.values()))


def _problem(check: FileCheck) -> str:
    if check.actual is None:
        return f"missing {check.file}"
    return f"sha256 mismatch for {check.file}: expected {check.expected[:12]}..., found {check.actual[:12]}..."


def _triple(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)
