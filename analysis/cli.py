"""`fastcifar analyze RUN_DIR` and `fastcifar compare RUN...`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def analyze_command(
    run_dir: Path = typer.Argument(..., help="Run folder (config.yaml + checkpoints), e.g. runs/quickstart."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Which checkpoint: best or last."),
    n: int = typer.Option(20, "--n", help="Misclassified test images to show (and Grad-CAM)."),
    pick: str = typer.Option("most-confident", "--pick", help="Which ones: most-confident, first or random."),
    seed: int = typer.Option(0, "--seed", help="Seed for --pick random."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Grad-CAM layer (module name, e.g. layer3); "
                                        "default: the deepest layer whose feature map is at least 5x5."),
    allow_small_layer: bool = typer.Option(False, "--allow-small-layer",
                                           help="Allow a --layer whose feature map is smaller than 5x5."),
    method: str = typer.Option("gradcam", "--method", help="gradcam, gradcam++, xgradcam, hirescam, layercam, "
                               "eigencam, eigengradcam, gradcamelementwise, scorecam or ablationcam."),
    target: str = typer.Option("predicted", "--target", help="Grad-CAM for the predicted or the true class."),
) -> None:
    """Analyse a run: predictions, curves, misclassified gallery, Grad-CAM on the same images,
    confusion matrix, per-class accuracy and report.md, all written into the run folder.

    Example: fastcifar analyze runs/quickstart
    """
    from train.stop import abandonable

    from .report import analyze

    # a stop request ends it at once: its files are written atomically, report.md last
    abandonable(analyze, run_dir, checkpoint=checkpoint, n=n, pick=pick, seed=seed, layer=layer,
                allow_small_layer=allow_small_layer, method=method, target=target, log=typer.echo,
                where=f"the analysis of {run_dir} stopped before its report.md was written")


def compare_command(
    runs: List[Path] = typer.Argument(..., help="Run folders (each with config.yaml and metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The PNG to write (default: compare.png in the "
                                       "folder holding the runs)."),
) -> None:
    """Draw runs side by side: test accuracy and loss per epoch overlaid, the LR of every step beside them,
    each run named by what differs between the configs.

    Example: fastcifar compare runs/smoke/seed_c runs/smoke/seed_d
    """
    from .compare import compare

    typer.echo(f"wrote {compare(list(runs), out)}")
