"""FFCV loaders over the betons, numba-JIT augmentations and a torch device path (see docs/design.md, `fastloader/`)."""
from beton.numba_cache import cache_ffcv_import

cache_ffcv_import()  # before any fastloader module imports ffcv: its import-time numba compile, paid once per machine
