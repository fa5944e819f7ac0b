"""Shared fixtures: a tiny synthetic data set in the competition's layout and a tiny trained run."""
from __future__ import annotations

import os

import pytest
from xdist_workers import auto_workers, share_cpu_threads

# Tests never reach the network: timm / huggingface must not try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The same intra-op threads as the entry points use, set before any test computes, so results do not depend on which
# entry point ran first; under pytest-xdist each worker takes its share of the cores.
share_cpu_threads()


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per usable core, at most 4 (tests/xdist_workers.py)."""
    return auto_workers()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA exists and are skipped elsewhere, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_BACKBONE = "vit_small_patch14_reg4_dinov2.lvd142m"
TINY_TRAIN_ARGS = [
    "--backbone", TINY_BACKBONE, "--no-pretrained", "--img-size", "28", "--batch-size", "4",
    "--num-workers", "0", "--device-type", "cpu", "--amp-dtype", "float32",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """30 training and 4 test photos of 224x112 px, generated once per test session."""
    from biomass5head.synthetic.generate import generate

    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate(out, n_train=30, n_test=4, size=(224, 112), seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """A finished 5-fold run (1 epoch, log targets, aux heads) on `tiny_data`."""
    from biomass5head.cli.train import main

    out = tmp_path_factory.mktemp("runs") / "run"
    rc = main(["--base-path", str(tiny_data), "--output-dir", str(out), "--epochs", "1", "--use-log-target",
               "--use-aux-heads", *TINY_TRAIN_ARGS])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def head_only(tiny_data, tmp_path_factory):
    """Two head-only runs (folds 0 and 1, --aug-prob 0) sharing one feature cache (tests/cache_runs.py)."""
    from cache_runs import head_only_runs

    return head_only_runs(tiny_data, tmp_path_factory.mktemp("head_only"))
