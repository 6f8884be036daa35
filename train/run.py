"""A run directory: the unit of output (docs/design.md).

runs/<name>/ holds config.yaml (resolved), metrics.jsonl (one JSON line per
epoch: what was learned, identical between reruns), timing.jsonl (seconds and
images/s per epoch, which vary), train.log (the summary lines), tb/
(TensorBoard events) and the checkpoints. metrics.jsonl is rewritten
atomically from the checkpoint's history, so after a crash or resume it always
matches the last checkpoint.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from beton.atomic import atomic_write_text, remove_leftovers
from beton.errors import UserError

from .config import safe_load


CONFIG, METRICS, TIMING, LOG, SUMMARY = "config.yaml", "metrics.jsonl", "timing.jsonl", "train.log", "summary.json"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    def create(self, config: dict, resume: bool) -> None:
        """Prepare the folder; refuse to mix a new run into an old one's files."""
        if not resume and (self.last.exists() or (self.path / METRICS).exists()):
            raise UserError(f"{self.path} already holds a run; use --resume {self.path} to continue it, "
                            f"or --out for a new folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run folder {self.path}: {e.strerror or e}") from e
        remove_leftovers(self.path)  # temporaries of a write that a crash cut short
        if not resume:
            self.write_config(config)

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def config(self) -> dict:
        path = self.path / CONFIG
        if not path.is_file():
            raise UserError(f"{self.path} is not a run folder (no {CONFIG})")
        try:
            return safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e

    def write_metrics(self, history: list[dict]) -> None:
        atomic_write_text(self.path / METRICS, "".join(json.dumps(m) + "\n" for m in history))

    def write_timing(self, timing: list[dict]) -> None:
        atomic_write_text(self.path / TIMING, "".join(json.dumps(t) + "\n" for t in timing))

    def metrics(self) -> list[dict]:
        return self._lines(METRICS)

    def timing(self) -> list[dict]:
        return self._lines(TIMING)

    def _lines(self, name: str) -> list[dict]:
        """A JSON-lines file of the run (none yet: empty)."""
        path = self.path / name
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=1) + "\n")

    def summary(self) -> dict | None:
        path = self.path / SUMMARY
        try:  # a damaged summary is as good as none: resuming from the checkpoint rewrites it
            summary = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) and "complete" in summary else None

    def log(self, line: str, echo: bool = True) -> None:
        """A summary line: printed, and appended to train.log with a timestamp."""
        if echo:
            print(line, flush=True)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.path / LOG, "a") as f:
                f.write(f"{stamp} {line}\n")
        except OSError as e:
            print(f"warning: cannot append to {self.path / LOG}: {e.strerror or e}", file=sys.stderr)
