"""Ctrl-C and SIGTERM: one stop request for the whole command, honoured in every phase.

See docs/guarantees.md, "Stopping and continuing". The CLI installs one `StopRequest` around the
command (`fit` installs its own when called from Python without one). A phase is one of two kinds:

- deferred (the training loop, the sweep's loop, everything that saves state or runs collectives
  under torchrun): the handler only records the request; `check(where)` at each phase boundary
  (after set-up, after each batch and each epoch, in the LR range test, between sweep runs)
  raises `Interrupted`, every rank agreeing under torchrun (a collective on every rank or none).
- abandonable (`abandonable(fn)`: the analysis, beton writing, a command's start-up): everything
  they write appears whole or not at all (beton.atomic) and a rerun redoes them, so the handler
  ends them at once; `abandonable` turns that into `Interrupted`.

The CLI prints `Interrupted` as one line, `interrupted: <where>; continue with: <command>`, and
exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM). A second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, TypeVar

from beton.errors import Interrupted

T = TypeVar("T")
DEFER, ABANDON = "defer", "abandon"


class Abandoned(BaseException):
    """Raised by the handler inside an abandonable phase (a BaseException, as KeyboardInterrupt is, so no
    `except Exception` swallows it); `StopRequest.abandonable` catches it."""


class StopRequest:
    """SIGINT/SIGTERM -> recorded, then honoured at the next phase boundary (or at once in an abandonable
    phase); a second Ctrl-C stops at once.

    In a deferred phase the handler only sets a flag: stopping mid-step could save a model whose
    optimizer step was half applied.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.signum: int | None = None
        self.quiet = quiet
        self._modes = [DEFER]
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        global _current
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._pid = os.getpid()
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
            self._outer, _current = _current, self
        return self

    def __exit__(self, *exc) -> None:
        global _current
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        if self._old:
            _current = self._outer

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker (FFCV's beton writer) inherited the handler: its parent
            raise SystemExit(128 + signum)  # decides; the worker ends quietly (multiprocessing prints no traceback)
        if self.signum is not None:  # a second signal
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self._modes[-1] == ABANDON:
            raise Abandoned(signum)
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: stopping at the next safe point (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """What the shell reports for a process ended by this signal: 128 + its number."""
        return 128 + (self.signum or signal.SIGINT)

    @contextlib.contextmanager
    def deferred(self) -> Iterator["StopRequest"]:
        """A deferred phase: a request is recorded and honoured at the next `check`."""
        self._modes.append(DEFER)
        try:
            yield self
        finally:
            self._modes.pop()

    def abandonable(self, fn: Callable[..., T], *args, where: str, then: str | None = None, **kwargs) -> T:
        """`fn(*args, **kwargs)` as an abandonable phase: a request (made before or during it) ends it at once
        with `Interrupted(where, then)`. Only for work that writes atomically and runs no collectives."""
        if self.requested:
            raise Interrupted(where, then)
        self._modes.append(ABANDON)
        try:
            return fn(*args, **kwargs)
        except Abandoned:
            raise Interrupted(where, then) from None
        finally:
            self._modes.pop()

    def agreed(self) -> bool:
        """Whether a stop was requested, on any rank under torchrun (a collective: every rank must call it)."""
        return _any_rank(self.requested)

    def check(self, where: str, then: str | None = None) -> None:
        """A phase boundary: raise `Interrupted(where, then)` if a stop was requested (on any rank: every
        rank must call it). `then` is the command that continues (None: the same command again)."""
        if self.agreed():
            raise Interrupted(where, then)


_current: StopRequest | None = None


@contextlib.contextmanager
def handling(quiet: bool = False) -> Iterator[StopRequest]:
    """The installed request, or, where none is (fit called from Python), one installed for this block."""
    if _current is not None:
        yield _current
        return
    with StopRequest(quiet) as request:
        yield request


def check(where: str, then: str | None = None) -> None:
    """`StopRequest.check` on the installed request (none installed: no handler, so nothing to honour)."""
    if _current is not None:
        _current.check(where, then)


def abandonable(fn: Callable[..., T], *args, where: str, then: str | None = None, **kwargs) -> T:
    """`StopRequest.abandonable` on the installed request (none installed: just `fn`)."""
    if _current is None:
        return fn(*args, **kwargs)
    return _current.abandonable(fn, *args, where=where, then=then, **kwargs)


def requested() -> bool:
    """Whether a stop was requested on this process (no collective: for loops that end on their own)."""
    return _current is not None and _current.requested


def _any_rank(flag: bool) -> bool:
    if "torch.distributed" not in sys.modules:  # torch not even imported: no process group
        return flag
    import torch

    from . import distributed

    if not distributed.current().active:
        return flag
    nccl = torch.distributed.get_backend() == "nccl"  # its collectives need the rank's GPU
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return distributed.any_rank(flag, device)
