"""Seeds and cross-validation options (strategies, --fold-csv, --num-folds, --train-folds), by their effect on a run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from spied_run import (
    Run,
    comparable_log,
    train,
)

from biomass5head.data.folds import make_folds
from biomass5head.data.tables import load_train


@pytest.mark.slow  # a few seconds; moved out of README command 2's budget
def test_seed_makes_a_run_repeatable(tiny_data, tmp_path_factory):
    fold_csv = str(tiny_data / "trainfold.csv")
    args = ("--fold-csv", fold_csv, "--batch-size", "8", "--epochs", "2")
    a = train(tmp_path_factory, tiny_data, *args, "--seed", "5")
    b = train(tmp_path_factory, tiny_data, *args, "--seed", "5")
    c = train(tmp_path_factory, tiny_data, *args, "--seed", "6")
    pd.testing.assert_frame_equal(comparable_log(a), comparable_log(b))
    ka, kb, kc = a.ckpt()["model"], b.ckpt()["model"], c.ckpt()["model"]
    assert all(torch.equal(ka[k], kb[k]) for k in ka)
    assert not all(torch.equal(ka[k], kc[k]) for k in ka)
    assert not comparable_log(a)["train_total"].equals(comparable_log(c)["train_total"])


def _folds_csv(run: Run) -> pd.DataFrame:
    return pd.read_csv(run.out / "folds.csv")


# group_date_state_bin stratifies by State x Total quartile: on 30 images no stratum has 5 members, so 4 folds.
@pytest.mark.parametrize("strategy, group, k", [
    ("group_month", "month", 5), ("group_date", "Sampling_Date", 5), ("group_date_state", "month", 5),
    ("group_date_state_bin", "month", 4), ("stratified", None, 5), ("random", None, 5)])
def test_cv_strategy_writes_its_folds(tiny_data, tmp_path_factory, strategy, group, k):
    run = train(tmp_path_factory, tiny_data, "--cv-strategy", strategy, "--num-folds", str(k), "--batch-size", "32")
    assert run.rc == 0
    folds = _folds_csv(run)
    df = load_train(tiny_data)
    assert list(folds.columns) == ["sample_id_prefix", "fold"]
    assert folds["sample_id_prefix"].tolist() == df["sample_id_prefix"].tolist()
    np.testing.assert_array_equal(folds["fold"].to_numpy(), make_folds(df, strategy, k, 18))
    assert sorted(folds["fold"].unique()) == list(range(k))
    if group is not None:  # no group is split between folds
        assert (df.assign(fold=folds["fold"]).groupby(group)["fold"].nunique() == 1).all()
    assert run.config["data"]["cv_strategy"] == strategy
    trainer = run.trainers[0]
    assert len(trainer.val_df) == int((folds["fold"] == 0).sum())


def test_fold_csv_overrides_the_cv_strategy(tiny_data, tmp_path_factory):
    given = pd.read_csv(tiny_data / "trainfold.csv")
    run = train(tmp_path_factory, tiny_data, "--fold-csv", str(tiny_data / "trainfold.csv"), "--cv-strategy",
                "random", "--batch-size", "32")
    folds = _folds_csv(run)
    assert dict(zip(folds["sample_id_prefix"], folds["fold"], strict=True)) == dict(
        zip(given["sample_id_prefix"], given["fold"], strict=True))
    assert set(run.trainers[0].val_df["sample_id_prefix"]) == set(given.loc[given["fold"] == 0, "sample_id_prefix"])


def test_num_folds_and_train_folds(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--num-folds", "3", "--train-folds", "0", "2", "--batch-size", "32")
    assert run.rc == 0
    folds = _folds_csv(run)
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    assert sorted(p.name for p in run.out.glob("5head_best_fold*.pth")) == ["5head_best_fold0.pth",
                                                                           "5head_best_fold2.pth"]
    assert sorted(p.name for p in run.out.glob("log_fold*.csv")) == ["log_fold0.csv", "log_fold2.csv"]
    assert sorted(run.summary["folds"]) == ["0", "2"] and run.summary["train_folds"] == [0, 2]
    for trainer, k in zip(run.trainers, (0, 2), strict=True):
        assert trainer.fold == k and run.ckpt(k)["fold"] == k
        assert set(trainer.val_df["sample_id_prefix"]) == set(folds.loc[folds["fold"] == k, "sample_id_prefix"])
        assert not set(trainer.train_df["sample_id_prefix"]) & set(trainer.val_df["sample_id_prefix"])
