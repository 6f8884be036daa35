"""The registry's ops as numba functions of an op code: what the kernels call for op k of a pipeline.

numba cannot call a function picked at run time from a table, so each family
(sample, kind, colour, box) is a chain of small jitted closures, one link per
registered op, `if code == this op's code: call it, else ask the next link`,
built here from the registry: no kernel names an op. An unknown code falls
through and does nothing (the packer admits only registered ops). Links and
the ops' functions are inlined into the kernels (numba IR), so they compile
to the if/elif chain a hand-written kernel would have, under the kernel's
own flags (fastmath for pixel code); called functions cost 2.5x in sampling.

`SALT` hashes the source of every module the kernels reach through these
chains. numba's on-disk cache keys a function by its own file only, so the
cached kernels hold it as a closure value: a new or edited op module then
compiles them afresh instead of loading code without it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from numba import njit

from . import OPS
from .base import BOX, COLOUR

_HERE = Path(__file__).resolve().parent
SALT = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_HERE.glob("*.py")) + [
    _HERE.parent / "rng.py", _HERE.parent / "params.py", _HERE.parent / "kernel.py"])).hexdigest()


def _sample_link(code, fn, rest, sees_epoch):
    if sees_epoch:
        @njit(inline="always")
        def sample(op, key, stream, s, size, row, m, ikey, epoch):
            if op == code:
                return fn(key, stream, s, size, row, m, ikey, epoch)
            return rest(op, key, stream, s, size, row, m, ikey, epoch)
    else:
        @njit(inline="always")
        def sample(op, key, stream, s, size, row, m, ikey, epoch):
            if op == code:
                return fn(key, stream, s, size, row, m)
            return rest(op, key, stream, s, size, row, m, ikey, epoch)
    return sample


def _kind_link(code, kind, rest):
    @njit(inline="always")
    def kind_of(op):
        if op == code:
            return kind
        return rest(op)
    return kind_of


def _colour_link(code, fn, rest):
    @njit(inline="always")
    def colour(op, v0, v1, v2, row, s):
        if op == code:
            return fn(v0, v1, v2, row, s)
        return rest(op, v0, v1, v2, row, s)
    return colour


def _box_link(code, fn, rest):
    @njit(inline="always")
    def box(op, row, s):
        if op == code:
            return fn(row, s)
        return rest(op, row, s)
    return box


@njit(inline="always")
def _no_sample(op, key, stream, s, size, row, m, ikey, epoch):
    return size


@njit(inline="always")
def _no_kind(op):
    return -1


@njit(inline="always")
def _no_colour(op, v0, v1, v2, row, s):
    return v0, v1, v2


@njit(inline="always")
def _no_box(op, row, s):
    return 0, 0, 0, 0, 0.0, 0.0, 0.0


def _inlined(fn):
    """An op's numba function, compiled again to be inlined (op modules need not say so)."""
    return njit(inline="always")(fn.py_func)


sample_op, kind_of, colour_op, box_op = _no_sample, _no_kind, _no_colour, _no_box
for _op in reversed(list(OPS.values())):
    _code = _op.spec.code
    sample_op = _sample_link(_code, _inlined(_op.sample), sample_op, _op.sees_epoch)
    kind_of = _kind_link(_code, _op.spec.kind, kind_of)
    if _op.spec.kind == COLOUR:
        colour_op = _colour_link(_code, _inlined(_op.colour), colour_op)
    elif _op.spec.kind == BOX:
        box_op = _box_link(_code, _inlined(_op.box), box_op)
