"""Fold-parallel training: processes with other --train-folds join one run folder; a per-fold lock keeps two of them
off one fold; eval takes the union of the folds trained."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import biomass5head.cli.eval
import biomass5head.cli.train
from biomass5head.train.shared_run import fold_lock_path, folds_in_training, held_lock

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--grid", "1", "1", "--batch-size", "4",
        "--device-type", "cpu", "--amp-dtype", "float32", "--epochs", "1"]


def _train(data, out, *extra) -> int:
    return biomass5head.cli.train.main(["--base-path", str(data), "--output-dir", str(out), *ARGS,
                                        "--num-workers", "0", *extra])


def _snapshot(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in run.iterdir()}


@pytest.fixture
def fold0_run(tiny_data, tmp_path) -> Path:
    run = tmp_path / "run"
    assert _train(tiny_data, run, "--train-folds", "0") == 0
    return run


def test_a_process_joins_a_run_and_eval_takes_the_union(fold0_run, tiny_data, capsys):
    config = (fold0_run / "config.json").read_bytes()
    folds = (fold0_run / "folds.csv").read_bytes()
    # Another process, another fold, another --num-workers, the folder spelled another way: it joins.
    other_spelling = f"{fold0_run.parent}/./{fold0_run.name}/"
    assert _train(tiny_data, other_spelling, "--train-folds", "1", "--num-workers", "1") == 0
    assert "joining the run" in capsys.readouterr().out
    assert (fold0_run / "config.json").read_bytes() == config and (fold0_run / "folds.csv").read_bytes() == folds
    summary = json.loads((fold0_run / "summary.json").read_text())
    assert sorted(summary["folds"]) == ["0", "1"] and summary["train_folds"] == [0, 1] and summary["complete"]
    assert {p.name for p in fold0_run.glob("5head_best_fold*.pth")} == {"5head_best_fold0.pth", "5head_best_fold1.pth"}
    assert not list(fold0_run.glob(".*lock"))  # locks are gone with the processes that held them

    assert biomass5head.cli.eval.main(["--model-dir", str(fold0_run), "--num-workers", "0", "--device", "cpu"]) == 0
    oof = json.loads((fold0_run / "oof_metrics.json").read_text())
    folds_df = pd.read_csv(fold0_run / "folds.csv")
    assert oof["n_images"] == int(folds_df["fold"].isin([0, 1]).sum())
    assert sorted(oof["per_fold"]) == ["0", "1"]


def test_joining_with_another_configuration_is_refused(fold0_run, tiny_data, capsys):
    before = _snapshot(fold0_run)
    assert _train(tiny_data, fold0_run, "--train-folds", "1", "--lr", "1e-3") == 2
    out = capsys.readouterr().out
    assert f"--output-dir {fold0_run} already holds a run with another configuration" in out
    assert "train.lr: 0.0002 -> 0.001" in out
    assert _snapshot(fold0_run) == before


def test_a_fold_already_trained_is_refused(fold0_run, tiny_data, capsys):
    before = _snapshot(fold0_run)
    assert _train(tiny_data, fold0_run, "--train-folds", "0") == 2
    assert "fold(s) [0] are trained" in capsys.readouterr().out
    assert _snapshot(fold0_run) == before


def test_a_fold_locked_by_another_process_is_refused(fold0_run, tiny_data, capsys):
    before = _snapshot(fold0_run)
    with held_lock(fold_lock_path(fold0_run, 2), wait=False):  # as a process training fold 2 holds it
        assert _train(tiny_data, fold0_run, "--train-folds", "1", "2") == 2
        out = capsys.readouterr().out
        assert f"fold 2 of {fold0_run} is being trained by another process" in out
        assert f"pid {os.getpid()}" in out
        assert not (fold0_run / "5head_best_fold1.pth").exists()  # nothing trained: all locks are taken first
    assert _snapshot(fold0_run) == before
    assert not fold_lock_path(fold0_run, 2).exists()


def test_only_held_locks_count_as_folds_in_training(tmp_path):
    (tmp_path / ".fold3.lock").write_text("pid 1 on a machine that was switched off")  # left by a killed process
    assert folds_in_training(tmp_path) == []
    with held_lock(fold_lock_path(tmp_path, 1), wait=False):
        assert folds_in_training(tmp_path) == [1]


def test_lock_is_exclusive_and_released():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ".fold0.lock"
        with held_lock(path, wait=False):
            with pytest.raises(Exception, match="is locked by pid"):
                with held_lock(path, wait=False):
                    pass
        with held_lock(path, wait=False):  # free again
            assert path.exists()
        assert not path.exists()


@pytest.mark.slow
def test_two_processes_train_two_folds_at_once(tiny_data, tmp_path):
    """The documented fold-parallel launch: two processes started together, one fold each, one run folder."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "src.train_5head", "--base-path", str(tiny_data),
                               "--output-dir", str(run), *ARGS, "--num-workers", "0", "--train-folds", str(k)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in (0, 1)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert sum("joining the run" in o for o in outputs) == 1  # one created the run, the other joined it
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["folds"]) == ["0", "1"] and summary["complete"]
    assert biomass5head.cli.eval.main(["--model-dir", str(run), "--num-workers", "0", "--device", "cpu"]) == 0
    oof = json.loads((run / "oof_metrics.json").read_text())
    assert sorted(oof["per_fold"]) == ["0", "1"]
