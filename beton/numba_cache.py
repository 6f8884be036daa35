"""Let numba keep on disk what importing FFCV compiles, so a process pays for it once per machine.

`ffcv.fields.rgb_image` fills a `numba.typed.Dict` when it is imported, and numba compiles its
generic typed-Dict helpers (`_make_dict`, `_setitem`, `_getitem`, ...) for it without its on-disk
cache: 3.3-3.6 s on a 2-core AMD EPYC in every process that imports ffcv (every `fastcifar train`,
each DDP rank, each test worker). With the cache enabled for those helpers the import takes about
0.5 s from the second process on. numba keys its cache on the helpers' own source file, so a numba
upgrade recompiles. Call `cache_ffcv_import()` before the first `import ffcv`.
"""
from __future__ import annotations

_done = False


def cache_ffcv_import() -> None:
    """Enable numba's on-disk cache for the typed-Dict helpers FFCV's import compiles (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    import numba.typed.typeddict as typeddict
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    try:
        for helper in vars(typeddict).values():
            if isinstance(helper, Dispatcher) and isinstance(helper._cache, NullCache):
                helper.enable_caching()
    except (RuntimeError, AttributeError):  # no writable cache location, or a numba without these internals:
        return  # numba compiles in memory, as it did
