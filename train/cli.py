"""`fastcifar train`, `sweep`, `lr-find`, `models`, `bench train`.

Heavy imports (torch, FFCV) happen inside the commands, so `fastcifar --help` and usage errors are quick.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import typer

from beton.errors import Interrupted, UserError

RUNS = Path("runs")
AfterRun = Callable[[Path], None]
AFTER_RUN = "after_run"  # key of the CLI context: what follows each finished run (the root passes the analysis,
# which train may not import: dependencies flow beton <- fastloader <- train -> analysis)
AFTER_RESULTS = "after_results"  # key of the CLI context: what follows each rewrite of a sweep's results.md
# (the root passes the side-by-side figure of the sweep's runs, from analysis too)


def _analysis_missing(path: Path) -> str:
    return f"the run in {path} is complete, its analysis is not (no report.md)"


def _after_run_of(ctx: typer.Context, analyze: bool) -> AfterRun | None:
    """The context's after-run step, on rank 0 alone under torchrun (the only rank that writes the run
    folder); None with --no-analyze or without one. A stop request ends it at once (its files are written
    atomically, report.md last): `Interrupted`, to be continued by `fastcifar analyze`."""
    step = (ctx.obj or {}).get(AFTER_RUN) if analyze else None
    if step is None:
        return None

    def after_run(path: Path) -> None:
        from . import distributed, stop

        if distributed.current().main:
            stop.abandonable(step, path, where=_analysis_missing(path), then=f"fastcifar analyze {path}")

    return after_run


def _positive(value: float | None) -> float | None:
    """--epochs: any positive number (a fraction trains part of the last epoch)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be positive, got {value:g}")
    return value


def _overrides(sets: list[str], epochs: float | None, subset: int | None) -> list[str]:
    extra = list(sets or [])
    if epochs is not None:
        extra.append(f"train.epochs={epochs:g}")
    if subset is not None:
        extra.append(f"data.subset={subset}")
    return extra


def train_command(
    ctx: typer.Context,
    config: Optional[Path] = typer.Argument(None, help="Experiment YAML (see configs/)."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set optimizer.lr=0.1 (repeatable)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", callback=_positive,
                                            help="Override train.epochs (7.6: 7 epochs and 60% of an 8th)."),
    subset: Optional[int] = typer.Option(None, "--subset", min=1, help="Train on the first N training images."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<config name>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint."),
    no_analyze: bool = typer.Option(False, "--no-analyze", help="Skip the analysis (report.md, gallery, Grad-CAM) at the end."),
) -> None:
    """Train one experiment into a run folder (config, metrics.jsonl, train.log, TensorBoard, checkpoints).

    Ctrl-C saves a checkpoint at the next batch; --resume continues from it. Several GPUs:
    torchrun --standalone --nproc_per_node=K $(which fastcifar) train CONFIG (data.batch_size is the global batch).

    Example: fastcifar train configs/quickstart.yaml --epochs 2 --subset 5000
    """
    from .config import build_config, load_config, run_settings_overrides
    from .run import CONFIG, RunDir

    if resume is not None:
        if config is not None or epochs or subset or out:
            raise UserError("--resume continues a run with its saved config; give no CONFIG, --epochs, --subset or "
                            "--out (--set only for how it runs, e.g. train.checkpoint_every)")
        run = RunDir(resume)
        cfg = build_config(run.config(), run_settings_overrides(sets or [], "--resume"), where=f"{resume}/{CONFIG}")
        restart = not run.last.is_file()  # stopped before its first checkpoint: start it again in place
    else:
        if config is None:
            raise UserError("give a CONFIG file (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
        cfg = load_config(config, _overrides(sets, epochs, subset))
        run, restart = RunDir(out or RUNS / cfg.name), False
    from . import distributed  # torch and FFCV load here: after the checks, so mistakes are reported at once
    from .loop import fit

    if restart:
        typer.echo(f"{resume} has no {run.last.name} yet: starting the run again from epoch 1", err=True)
    from .stop import check

    history = fit(cfg, run, resume=resume is not None and not restart)
    if history and distributed.current().main:
        best = max(history, key=lambda m: m["test_acc"])
        typer.echo(f"done: final test accuracy {history[-1]['test_acc']:.2f}%, best {best['test_acc']:.2f}% "
                   f"at epoch {best['epoch']}; run folder {run.path}")
    after_run = _after_run_of(ctx, not no_analyze)
    if history and after_run is not None:
        check(_analysis_missing(run.path), then=f"fastcifar analyze {run.path}")  # a request during the last epoch
        after_run(run.path)


def sweep_command(
    ctx: typer.Context,
    configs: List[Path] = typer.Argument(..., help="Config files and/or folders of *.yaml configs."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override a key in every config (repeatable)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", callback=_positive,
                                            help="Override train.epochs in every config."),
    subset: Optional[int] = typer.Option(None, "--subset", min=1, help="Train on the first N training images."),
    out: Path = typer.Option(RUNS, "--out", help="Folder for the runs and results.md."),
    no_analyze: bool = typer.Option(False, "--no-analyze", help="Skip each run's analysis (report.md, linked from results.md) and compare.png."),
) -> None:
    """Train each config (complete runs are skipped, partial ones resumed) and fill results.md; compare.png
    beside it draws the runs side by side (as `fastcifar compare`).

    Example: fastcifar sweep configs/seeds --epochs 1 --subset 5000 --out runs/smoke
    """
    from . import distributed
    from .sweep import sweep

    main = distributed.launched().main  # under torchrun, rank 0 alone prints and writes
    try:  # it prints results.md, then its last line: each run's accuracy, the minutes, the machine
        sweep(list(configs), _overrides(sets, epochs, subset), out,
              log=typer.echo if main else lambda m: None,
              after_run=_after_run_of(ctx, not no_analyze) or (lambda path: None),
              after_results=(None if no_analyze else (ctx.obj or {}).get(AFTER_RESULTS))
              or (lambda out, runs: None))
    except Interrupted as e:  # the same sweep continues: complete runs skipped, a partial one resumed, analyses redone
        raise Interrupted(e.where) from None


BENCH_BATCH = 128  # `bench train --model M` without a config: kuangliu's and most seeds' batch


def bench_train_command(
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML to take model, data and precision from."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (overrides the config's), e.g. resnet18."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help=f"Batch size for every measurement (default: the config's; "
                                                  f"{BENCH_BATCH} with --model alone)."),
    steps: int = typer.Option(5, "--steps", min=1, help="Timed training steps per measurement."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Alternating pairs of loop measurements (medians)."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key (repeatable)."),
    compile: bool = typer.Option(False, "--compile", help="Also time the run's precision under torch.compile."),
    loop_only: bool = typer.Option(False, "--loop-only", help="Only the loop: real loader vs in-memory batches."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Training images/s: fp32 NCHW, fp32 and bf16 channels_last (what precision auto picks), optionally
    torch.compile, and the loop on real vs in-memory batches.

    Example: fastcifar bench train --model resnet18 --batch-size 128 --steps 5
    """
    import json

    from .bench import run
    from .config import build_config, load_config

    extra = list(sets or []) + ([f"data.batch_size={batch_size}"] if batch_size else []) + \
        ([f"model.name={model}"] if model else [])
    cfg = (load_config(config, extra) if config
           else build_config({"name": "bench", "data": {"batch_size": BENCH_BATCH}}, extra))
    r = run(cfg, steps, compile, loop_only=loop_only, rounds=rounds)
    if as_json:
        typer.echo(json.dumps(r))
        return
    from .hardware import cpu_model

    typer.echo(f"{r['model']}, batch {r['batch_size']}, {r['device']} ({cpu_model()}), {r['threads']} threads; "
               + (f"precision auto -> {r['auto']}, " if "auto" in r else "") + f"this config runs {r['precision']}")
    if "fp32_nchw" in r:
        typer.echo(f"fp32 NCHW                    {r['fp32_nchw']:>10,.1f} img/s")
        for key, label in (("fp32_channels_last", "fp32 channels_last"), ("bf16_channels_last", "bf16 channels_last")):
            typer.echo(f"{label:<29}{r[key]:>10,.1f} img/s  ({r[key] / r['fp32_nchw']:.2f}x)")
    if "compiled" in r:
        typer.echo(f"{r['precision']} + torch.compile          {r['compiled']:>10,.1f} img/s  "
                   f"(compiling took {r['compile_seconds']:.1f} s)")
    low, high = r["loop_efficiency_range"]
    typer.echo(f"loop, in-memory batches      {r['loop_synthetic']:>10,.1f} img/s  (median of {r['rounds']})")
    typer.echo(f"loop, real loader            {r['loop_real_loader']:>10,.1f} img/s  "
               f"(efficiency {r['loop_efficiency']:.3f}, pairs {low:.3f}-{high:.3f}; after the epoch's start)")
    typer.echo(f"an epoch's start             {r['epoch_start_seconds']:>10.2f} s      "
               f"(over one of this config's epochs: efficiency {r['loop_efficiency_epoch']:.3f})")
    typer.echo(f"loader alone                 {r['loader_cpu_ms_per_image']:>10.3f} CPU ms/img  (the step: "
               f"{r['step_cpu_ms_per_image']:.3f}; the loader's share {100 * r['loader_cpu_share']:.2f}%)")
    typer.echo(f"real loop's extra CPU        {r['real_loop_extra_cpu_ms_per_image']:>10.3f} CPU ms/img  "
               f"(over the in-memory loop, paired median)")


def bench_loop_command(
    configs: List[Path] = typer.Argument(..., help="Config files, or folders of them (their *.yaml)."),
    steps: int = typer.Option(10, "--steps", min=1, help="Timed training steps per measurement."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Alternating pairs of loop measurements (medians)."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override a key in every config (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per config instead of a table."),
) -> None:
    """The loop efficiency of every config: its training loop over the real loader against one in-memory
    batch, and the loader's CPU share; a Markdown table, one row per config, as each is measured.

    Example: fastcifar bench loop configs/ configs/seeds/ --steps 10
    """
    import json

    from .bench import run
    from .config import load_config
    from .sweep import collect

    files = collect(list(configs))
    loaded = [load_config(path, list(sets or [])) for path in files]  # every config checked before any timing
    if not as_json:
        from .hardware import machine

        typer.echo(f"{machine()}; {steps} steps a measurement, {rounds} alternating pairs\n")
        typer.echo("| config | model | batch | precision | in-memory img/s | real loader img/s | loop efficiency "
                   "(median; pairs) | epoch start s | efficiency over an epoch | loader's CPU share | "
                   "real loop's extra CPU ms/img |")
        typer.echo("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path, cfg in zip(files, loaded):
        r = run(cfg, steps, loop_only=True, rounds=rounds)
        if as_json:
            typer.echo(json.dumps({"config": str(path), **r}))
            continue
        low, high = r["loop_efficiency_range"]
        typer.echo(f"| `{path}` | {r['model']} | {r['batch_size']} | {r['precision']} | {r['loop_synthetic']:,.1f} | "
                   f"{r['loop_real_loader']:,.1f} | {r['loop_efficiency']:.3f} ({low:.3f}-{high:.3f}) | "
                   f"{r['epoch_start_seconds']:.2f} | {r['loop_efficiency_epoch']:.3f} | "
                   f"{100 * r['loader_cpu_share']:.2f}% | {r['real_loop_extra_cpu_ms_per_image']:.3f} |")


def bench_steps_command(
    configs: List[Path] = typer.Argument(..., help="Config files, or folders of them (their *.yaml)."),
    rounds: int = typer.Option(10, "--rounds", min=1, help="Timed steps of each config, taken in turn."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override a key in every config (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per config instead of a table."),
) -> None:
    """Training-step cost of several configs side by side: one step of each in turn, so that the machine's
    slow spells hit all alike; per image, each one's fastest, median and slowest step, and its median ratio
    to the first config's step of the same round.

    Example: fastcifar bench steps configs/speed94.yaml my_silu_variant.yaml --rounds 10
    """
    import json

    from .bench import turn_about
    from .config import load_config
    from .sweep import collect

    files = collect(list(configs))
    loaded = [load_config(path, list(sets or [])) for path in files]  # every config checked before any timing
    results = turn_about(loaded, rounds)
    if as_json:
        for path, r in zip(files, results):
            typer.echo(json.dumps({"config": str(path), **r}))
        return
    from .hardware import machine

    typer.echo(f"{machine()}; {rounds} steps of each config, in turn (synthetic batches)\n")
    typer.echo("| config | model | batch | precision | fastest ms/img | median ms/img | slowest ms/img | "
               "img/s (median) | over the first (median of rounds) |")
    typer.echo("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path, r in zip(files, results):
        typer.echo(f"| `{path}` | {r['model']} | {r['batch_size']} | {r['precision']} | {r['fastest_ms']:.3f} | "
                   f"{r['median_ms']:.3f} | {r['slowest_ms']:.3f} | {r['images_per_s']:,.1f} | {r['vs_first']:.3f} |")


def bench_machine_command(
    seconds: float = typer.Option(20.0, "--seconds", min=1.0, help="How long to watch."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """How steady this machine's speed is: a fixed matmul in fp32 and bf16, half a second each, again and
    again; min, median and max GFLOP/s. Compare timings only where max/min is near 1, or alternate them.

    Example: fastcifar bench machine --seconds 20
    """
    import json

    from .bench import steadiness
    from .hardware import machine

    r = steadiness(seconds)
    if as_json:
        typer.echo(json.dumps({"machine": machine(), **r}))
        return
    typer.echo(f"{machine()}: 1024 x 1024 matmul, GFLOP/s per half second over {seconds:g} s")
    for name, found in r.items():
        typer.echo(f"{name:<9} min {found['min']:8.1f}  median {found['median']:8.1f}  max {found['max']:8.1f}  "
                   f"max/min {found['max_over_min']:.2f}")


def bench_speedrun_command(
    config: Path = typer.Argument(..., help="Experiment YAML (e.g. configs/speed94.yaml)."),
    runs: int = typer.Option(3, "--runs", min=1, help="Runs, with seeds 0..N-1."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (accuracies, mean_accuracy, seconds, "
                                 "mean_seconds, ...)."),
) -> None:
    """Time to accuracy: N full runs of CONFIG with different seeds; mean and spread of the final test
    accuracy, wall time per run with set-up, compile and TTA shown apart.

    Example: fastcifar bench speedrun configs/speed94.yaml --runs 3
    """
    import json

    from .config import load_config
    from .speedrun import speedrun

    cfg = load_config(config, list(sets or []))
    try:
        r = speedrun(cfg, runs, log=(lambda line: None) if as_json else typer.echo)
    except Interrupted:  # its runs live in a temporary folder, gone now
        raise Interrupted(f"bench speedrun stopped before its {runs} runs ended; a rerun times each run "
                          f"afresh") from None
    if as_json:
        typer.echo(json.dumps(r))
        return
    from .hardware import cpu_model

    typer.echo(f"{cfg.name}: {runs} runs on {cpu_model()}: test accuracy {r['mean_accuracy']:.2f}% "
               f"(sd {r['std_accuracy']:.2f}; {', '.join(f'{a:.2f}' for a in r['accuracies'])}), "
               f"{r['mean_seconds']:.1f} s per run")


def lr_find_command(
    config: Path = typer.Argument(..., help="Experiment YAML (model, data, optimizer are taken from it)."),
    start: float = typer.Option(1e-7, "--start", help="First LR of the range."),
    end: float = typer.Option(10.0, "--end", help="Last LR of the range."),
    iters: int = typer.Option(100, "--iters", help="Batches (LR steps) in the test."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set model.name=resnet34 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for lr_find.png and lr_find.json "
                                       "(default: runs/<name>-lr-find)."),
) -> None:
    """LR range test: exponential LR steps from --start to --end, smoothed loss, stop on divergence;
    writes lr_find.png and lr_find.json and prints the suggestions (steepest, valley, minimum, min/10).

    Example: fastcifar lr-find configs/custom_resnet_onecycle.yaml --iters 100
    """
    import warnings

    from .config import load_config
    from .lr_find import _check_range, describe, lr_find, write
    from .stop import abandonable

    _check_range(start, end, iters, 0.98, 4.0)
    cfg = load_config(config, list(sets or []))
    folder = out or RUNS / f"{cfg.name}-lr-find"
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # before the test, not after minutes of it
        raise UserError(f"cannot write to {folder}: {blocker} is a file, not a folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = abandonable(lr_find, cfg, start=start, end=end, iters=iters,
                             where="the LR range test stopped; nothing was written")
    json_path, png_path = write(result, folder, f"{cfg.name}: LR range test")
    typer.echo(f"LR range test of {cfg.name}: {result['steps']} steps from {start:.1e} to {end:.1e}")
    for line in describe(result):
        typer.echo(line)
    rule = cfg.scheduler.max_lr_rule
    typer.echo(f"for OneCycle: --set scheduler.max_lr={result['suggestions'][rule]:.3g} ({rule}), "
               f"or scheduler.max_lr: find (scheduler.max_lr_rule picks the suggestion)")
    typer.echo(f"wrote {json_path} and {png_path}")


def models_command(as_json: bool = typer.Option(False, "--json", help="Print one JSON object: name -> parameters.")):
    """List the registered models with their parameter counts (10 classes, batch norm).

    Example: fastcifar models --json
    """
    import json

    from .models import TIMM_PREFIX, registered_counts

    counts = registered_counts()
    if as_json:
        typer.echo(json.dumps(counts))
        return
    width = max(len(name) for name in [*counts, TIMM_PREFIX + "<name>"])
    for name, count in counts.items():
        typer.echo(f"{name:<{width}}  {count:>12,} parameters")
    typer.echo(f"{TIMM_PREFIX + '<name>':<{width}}  any timm model (see timm.list_models()), e.g. timm:resnet10t")
