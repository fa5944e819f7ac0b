"""The suite's own parallelism, used by tests/conftest.py: pyproject's addopts run it with `-n auto` (pytest-xdist).

Each worker builds its own session fixtures (the tiny runs), so more workers than MAX_TEST_WORKERS cost more than
they save on a suite this size; and each worker's torch takes its share of the cores, since threads oversubscribing
the cores make every worker several times slower.
"""
from __future__ import annotations

import os

from biomass5head.device import configure_cpu_threads, usable_cores

MAX_TEST_WORKERS = 4


def auto_workers() -> int:
    """Workers for `-n auto`: PYTEST_XDIST_AUTO_NUM_WORKERS if set, else the usable cores (affinity and cgroup quota,
    not the machine's count), at most MAX_TEST_WORKERS; 0 (the suite runs in pytest's own process) on one core."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = usable_cores()
    return 0 if cores < 2 else min(cores, MAX_TEST_WORKERS)


def share_cpu_threads() -> int:
    """Set this process's intra-op threads as the entry points set theirs (the usable cores), shared by the xdist
    workers. Under xdist OMP_NUM_THREADS carries the share to the entry points the tests call (an explicit
    OMP_NUM_THREADS wins there) and to their subprocesses. Returns the thread count."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and not os.environ.get("OMP_NUM_THREADS"):
        threads = configure_cpu_threads(processes=workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        return threads
    return configure_cpu_threads()
