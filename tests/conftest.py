import os
import tempfile

# pytest-xdist workers (make test runs two on a 2-core machine) each get their own core(s), before torch or
# numba is imported: torch sizes its thread pool from the affinity (fastloader.threads), and two workers
# whose pools each spin on both cores slow each other down 4x (a tiny training epoch: 0.55 s alone, 2-2.5 s
# beside a second run, 1.1 s with the two pinned; 2-core AMD EPYC). Subprocesses inherit the pinning.
# numba keeps the machine's thread count, so that tests of thread counts still run two threads.
_worker, _workers = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _worker.startswith("gw") and _workers > 1 and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    if len(_cores) >= _workers:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(len(_cores)))
        os.sched_setaffinity(0, _cores[int(_worker[2:]) % _workers::_workers])

# `precision: auto` caches its CPU measurement per machine; tests keep theirs apart from the user's.
os.environ.setdefault("FASTCIFAR_CACHE", tempfile.mkdtemp(prefix="fastcifar-cache-"))

# Shared fixtures live in modules named *_fixtures.py, registered here.
pytest_plugins = ["tests.fastloader_fixtures", "tests.train_fixtures"]
