"""The `fastcifar` command: one typer app composed from the packages' own sub-commands.

User errors (`beton.errors.UserError`, bad CLI usage) become one line
`error: ...` on stderr and exit code 2; `--debug` shows the traceback instead.
Ctrl-C and SIGTERM: one `train.stop.StopRequest` for the whole command; the stop ends as one line
`interrupted: <where>; continue with: <command>` on stderr and exit code 128 + the signal's number.
"""
from __future__ import annotations

import os
import shlex
import sys

import click
import typer
from typer.exceptions import TyperException

from analysis.cli import analyze_command, compare_command
from beton.cli import app as beton_app
from beton.errors import Interrupted, UserError
from fastloader.cli import bench_loader
from train.cli import (AFTER_RESULTS, AFTER_RUN, bench_loop_command, bench_machine_command, bench_speedrun_command,
                       bench_steps_command, bench_train_command, lr_find_command, models_command, sweep_command,
                       train_command)
from train.stop import StopRequest

app = typer.Typer(
    help="fastcifar: fast CIFAR training on FFCV betons with JIT augmentations.\n\n"
    "Example: fastcifar beton write --source ../shared/data/cifar-10-batches-py",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(beton_app, name="beton")

bench_app = typer.Typer(help="Benchmarks that print numbers (images/s).", no_args_is_help=True)
bench_app.command("loader")(bench_loader)
bench_app.command("train")(bench_train_command)
bench_app.command("speedrun")(bench_speedrun_command)
bench_app.command("loop")(bench_loop_command)
bench_app.command("machine")(bench_machine_command)
bench_app.command("steps")(bench_steps_command)
app.add_typer(bench_app, name="bench")
app.command("train")(train_command)
app.command("sweep")(sweep_command)
app.command("models")(models_command)
app.command("lr-find")(lr_find_command)
app.command("analyze")(analyze_command)
app.command("compare")(compare_command)


def _analyze_run(run_dir) -> None:
    """The analysis after each run: train calls it, but may not import analysis (imported here when needed)."""
    from analysis.report import analyze

    analyze(run_dir, log=typer.echo)


def _compare_sweep(out, runs) -> None:
    """A sweep's runs side by side, beside its results.md (train calls it, as it does the analysis)."""
    from analysis.compare import COMPARE, compare

    compare(runs, out / COMPARE, title=f"sweep {out}")


@app.callback()
def _root(ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    """fastcifar: fast CIFAR training on FFCV betons with JIT augmentations."""
    # `train` and `sweep` run the analysis after each run, `sweep` the comparison after each (unless --no-analyze)
    ctx.obj = {AFTER_RUN: _analyze_run, AFTER_RESULTS: _compare_sweep}


def _fail(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    with StopRequest(quiet=os.environ.get("RANK", "0") != "0") as stop:  # torchrun: rank 0 alone speaks
        _run(argv, stop)


def _run(argv: list[str], stop: StopRequest) -> None:
    debug = "--debug" in argv
    try:  # what no phase defers (start-up, beton writing, benchmarks) stops at once: it writes atomically
        result = stop.abandonable(typer.main.get_command(app).main, args=argv, prog_name="fastcifar",
                                  standalone_mode=False, where="stopped before it finished; nothing was half-written")
    except UserError as e:
        if debug:
            raise
        _fail(str(e))
    except (click.exceptions.ClickException, TyperException) as e:  # typer may vendor its own click
        if debug:
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
            sys.exit(0)
        _fail(e.format_message())
    except Interrupted as e:
        if not stop.quiet:
            print(f"interrupted: {e.where}; continue with: {e.then or shlex.join(['fastcifar', *argv])}",
                  file=sys.stderr)
        sys.exit(stop.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    else:
        sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
