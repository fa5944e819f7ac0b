"""The suite's own parallelism (tests/xdist_workers.py): how many pytest-xdist workers `-n auto` starts, and the
share of the cores each worker's torch uses."""
from __future__ import annotations

import os

import pytest
import torch
import xdist_workers


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 2), (3, 3), (4, 4), (64, xdist_workers.MAX_TEST_WORKERS)])
def test_auto_starts_one_worker_per_usable_core_up_to_the_cap(monkeypatch, cores, workers):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(xdist_workers, "usable_cores", lambda: cores)
    assert xdist_workers.auto_workers() == workers


def test_auto_follows_the_environment_variable(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")
    monkeypatch.setattr(xdist_workers, "usable_cores", lambda: 64)
    assert xdist_workers.auto_workers() == 3


def test_workers_share_the_cores_instead_of_each_taking_all():
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = max(1, xdist_workers.usable_cores() // count)
    if os.environ.get("OMP_NUM_THREADS", str(share)) != str(share):
        pytest.skip("OMP_NUM_THREADS was set before the suite started, and an explicit value wins")
    assert torch.get_num_threads() == share
