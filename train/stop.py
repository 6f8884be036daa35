"""Ctrl-C and SIGTERM during training: finish the batch, save a checkpoint, stop."""
from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """SIGINT/SIGTERM -> stop at the next batch boundary (a second Ctrl-C stops at once).

    A handler only sets a flag: stopping mid-step could save a model whose
    optimizer step was half applied.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.signum: int | None = None
        self.quiet = quiet
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: stopping after this batch (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None
