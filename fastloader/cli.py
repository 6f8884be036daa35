"""`fastcifar bench loader`."""
from __future__ import annotations

import json
from typing import Optional

import typer

from beton.errors import UserError
from beton.manifest import read_manifest
from beton.paths import dataset_dir


def bench_loader(
    beton: Optional[str] = typer.Option(None, "--beton", help="Folder with train.beton, test.beton, manifest.json "
                                        "(default: $FASTCIFAR_DATA/cifar10)."),
    batches: int = typer.Option(100, "--batches", min=1, help="Batches of 512 timed per fastcifar/FFCV pipeline "
                                "(the DataLoader baselines time a fifth of that)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Threads/processes for every pipeline "
                                          "(default: this machine's cores)."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Only time fastcifar's own pipelines."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object of images/s instead of a table."),
    augment: Optional[str] = typer.Option(None, "--augment", help="Augmentation list for fastcifar's pipelines: "
                                          "inline YAML (a data.augment list) or a YAML file holding one, or an "
                                          "experiment config (its data.augment). The baselines are then skipped, "
                                          "since they do the default list's work."),
) -> None:
    """Images/s of the train (loader and device paths) and test pipelines vs torchvision, albumentations, FFCV.

    Example: fastcifar bench loader --beton data/cifar10 --batches 100
    Example: fastcifar bench loader --no-baselines --augment '[{random_crop: {padding: 4, fill: reflect}}, flip]'
    """
    from .bench import KEYS, run  # heavy imports only when the command runs

    folder = beton or str(dataset_dir("cifar10"))
    _check_one_batch(folder)
    augs = _augment_list(augment) if augment is not None else None
    results = run(folder, batches, workers, baselines_too=not no_baselines and augs is None, augment=augs)
    if as_json:
        typer.echo(json.dumps(results))
        return
    ref = results.get("albumentations")
    what = "crop 32 pad 4, flip, rotate +-5, cutout 16" if augs is None else json.dumps(augs)
    typer.echo(f"augmentation: {what}, normalise, float32 channels_last; {results['workers']} workers, batch 512")
    typer.echo(f"{'pipeline':<20}{'images/s':>12}{'x albumentations':>18}")
    for key in KEYS:
        if key in results:
            ratio = f"{results[key] / ref:.1f}x" if ref else "-"
            typer.echo(f"{key:<20}{results[key]:>12,.0f}{ratio:>18}")
    typer.echo(f"first train batch (pipeline compile): {results['first_batch_s']:.1f} s; "
               f"resident memory with train and test loaders: {results['rss_mb_both_loaders']:,.0f} MiB")


def _augment_list(text: str) -> list:
    """`--augment`: inline YAML, or a YAML file with a list or an experiment config (its data.augment),
    checked as `data.augment` is."""
    from pathlib import Path

    import yaml

    from .config import DataConfig

    path = Path(text)
    if path.suffix in (".yaml", ".yml") and not path.is_file():
        raise UserError(f"--augment: file not found: {text}")
    try:
        data = yaml.safe_load(path.read_text() if path.suffix in (".yaml", ".yml") and path.is_file() else text)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--augment: cannot read {text!r}: {str(e).splitlines()[0]}") from e
    if isinstance(data, dict):
        data = (data.get("data") or {}).get("augment") if isinstance(data.get("data"), dict) else None
    if not isinstance(data, list):
        raise UserError(f"--augment: expected a list of augmentations (or a config with data.augment), got {text!r}")
    DataConfig(augment=data)  # one-line errors for bad entries
    return data


def _check_one_batch(folder: str) -> None:
    """The benchmark times full batches (drop_last): a smaller train split would yield none,
    and the timing loop, cycling epochs, would wait forever for one."""
    from .config import DataConfig

    batch = DataConfig().batch_size
    count = read_manifest(folder)["splits"]["train"]["count"]
    if count < batch:
        raise UserError(f"bench loader times batches of {batch}: {folder} has only {count} training images")
