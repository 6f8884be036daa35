import collections
import os
import tempfile

import pytest  # torch and numba are imported later, after the pinning below

# pytest-xdist workers (make test runs two on a 2-core machine) each get their own core(s), before torch or
# numba is imported: torch sizes its thread pool from the affinity (fastloader.threads), and two workers
# whose pools each spin on both cores slow each other down 4x (a tiny training epoch: 0.55 s alone, 2-2.5 s
# beside a second run, 1.1 s with the two pinned; 2-core AMD EPYC). Subprocesses inherit the pinning.
# numba keeps the machine's thread count, so that tests of thread counts still run two threads.
_worker, _workers = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
if _worker.startswith("gw") and _workers > 1 and ALL_CORES and len(ALL_CORES) >= _workers:
    os.environ.setdefault("NUMBA_NUM_THREADS", str(len(ALL_CORES)))
    os.sched_setaffinity(0, ALL_CORES[int(_worker[2:]) % _workers::_workers])

# `precision: auto` caches its CPU measurement per machine; tests keep theirs apart from the user's.
os.environ.setdefault("FASTCIFAR_CACHE", tempfile.mkdtemp(prefix="fastcifar-cache-"))

# Shared fixtures live in modules named *_fixtures.py, registered here.
pytest_plugins = ["tests.fastloader_fixtures", "tests.train_fixtures"]


def pytest_collection_modifyitems(config, items):
    """Files with the most `slow` tests first, the rest in their order. `make test` hands whole files to its two
    workers in this order (`--no-loadscope-reorder`; xdist's default puts files with many tests first, which
    left the few long trainings of test_reliability and test_distributed to one worker at the end)."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: within a file, and among equals, the order stays


@pytest.fixture
def whole_machine():
    """The test runs on every core, as a user's process would, not on its worker's share: for comparisons
    whose numerics depend on the thread counts (torchrun's ranks split the cores between them)."""
    if not ALL_CORES:
        yield
        return
    import torch

    mine, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, ALL_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(threads)
