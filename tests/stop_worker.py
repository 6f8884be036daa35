"""`fastcifar` itself, sending itself SIGTERM when a named function is called for the n-th time.

    python tests/stop_worker.py MODULE.FUNCTION@N -- ARGS...

e.g. `train.loop.evaluate@2 -- sweep configs/`: a scheduler's SIGTERM arriving as the second evaluation
starts, at the same point on every run of the test (a test that polls for a file would race the phase).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

from fastcifar_cli import main

target, _, nth = sys.argv[1].partition("@")
module_name, _, name = target.rpartition(".")
module = importlib.import_module(module_name)
original = getattr(module, name)
calls = 0


def signalling(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(nth):
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)


setattr(module, name, signalling)
main(sys.argv[3:])  # after the "--"
