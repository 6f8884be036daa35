"""FFCV's compiled pipeline functions, compiled once per process instead of once per Loader.

FFCV's `Compiler.compile` wraps each operation's code in a new numba dispatcher whenever a Loader
generates its code (its first epoch): the image decoder, the label and index decoders and the memory
reader, about 0.4 + 0.15 + 0.15 s of numba compilation for every loader on a 2-core Xeon, though the
functions are the same each time. A sweep, a budget probe, a test suite or the validation split builds
many loaders; FFCV offers no way to reuse the compiled code, hence this module.

`install()` makes `Compiler.compile` return the dispatcher it made before for the same compilation: the
same code object and globals, the same closure values, the same signature and the same flags (parallel,
enabled). Closure values compare by identity (arrays, dispatchers, any object: numba freezes them into
the code as they are when it compiles, so an identical object is the only safe match), numbers, strings and
numba types by value. A function whose closure holds anything else is compiled as FFCV would.
"""
from __future__ import annotations

import numbers
import threading
import types

import numba
from ffcv.pipeline.compiler import Compiler

_ORIGINAL = Compiler.compile.__func__
_CACHE: dict = {}
_LOCK = threading.Lock()
_BY_VALUE = (numbers.Number, str, bytes, bool, type(None), numba.types.Type)


class _Same:
    """A closure value compared by identity; holds the object, so that its id is never reused."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _value_key(value):
    if isinstance(value, _BY_VALUE):
        return (type(value), value)
    return _Same(value)


def compilation_key(code, signature=None):
    """What determines the compiled code of `Compiler.compile(code, signature)`, or None when it cannot be
    told (not a plain Python function, or an empty closure cell)."""
    if not isinstance(code, types.FunctionType):
        return None
    try:
        cells = tuple(_value_key(cell.cell_contents) for cell in (code.__closure__ or ()))
        defaults = tuple(_value_key(v) for v in (code.__defaults__ or ()))
        hash(signature)
    except (ValueError, TypeError):  # an empty cell, an unhashable signature
        return None
    parallel = bool(getattr(code, "is_parallel", False)) and Compiler.num_threads > 1
    return (code.__code__, id(code.__globals__), cells, defaults, signature, parallel, Compiler.is_enabled)


def _compile(cls, code, signature=None):
    key = compilation_key(code, signature)
    if key is None:
        return _ORIGINAL(cls, code, signature)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _ORIGINAL(cls, code, signature)
        return _CACHE[key]


def install() -> None:
    """Route FFCV's `Compiler.compile` through the cache (idempotent)."""
    Compiler.compile = classmethod(_compile)
