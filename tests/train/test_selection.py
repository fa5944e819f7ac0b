"""`--select-on inner` / `--inner-frac`: the epoch is chosen on an inner split of the training folds, grouped like the
outer split, and the scored fold is never seen in training; `--recipe` fills in its bundle of defaults, options given
explicitly win, and config.json records the resolved values."""
from __future__ import annotations

import pytest
from spied_run import N_TRAIN_FOLD0, train

from biomass5head.cli.train import build_parser, config_from_args
from biomass5head.config import ConfigError
from biomass5head.data.folds import make_folds
from biomass5head.data.tables import load_train
from biomass5head.recipes import RECIPE_DEFAULTS


@pytest.fixture(scope="module")
def inner_run(tiny_data, tmp_path_factory):
    return train(tmp_path_factory, tiny_data, "--select-on", "inner", "--inner-frac", "0.25", "--epochs", "2")


def test_inner_selection_never_sees_the_scored_fold(inner_run, tiny_data):
    assert inner_run.rc == 0
    df = load_train(tiny_data)
    scored = set(df["sample_id_prefix"][make_folds(df, "group_month", 5, 18) == 0])
    (trainer,) = inner_run.trainers
    fit, select = set(trainer.train_df["sample_id_prefix"]), set(trainer.val_df["sample_id_prefix"])
    assert not (fit | select) & scored and len(fit | select) == N_TRAIN_FOLD0 and not fit & select
    assert set(trainer.train_df["month"]).isdisjoint(trainer.val_df["month"])  # grouped like group_month
    # every validation the run did (the best-epoch choice) was on the inner split's images only
    assert inner_run.preds and all(len(p["true"]) == len(select) for p in inner_run.preds)
    assert inner_run.summary["selected_on"] == "inner" and inner_run.summary["folds"]["0"]["selected_on"] == "inner"
    assert inner_run.summary["folds"]["0"]["n_val"] == len(select)
    assert inner_run.config["train"]["select_on"] == "inner" and inner_run.config["train"]["inner_frac"] == 0.25
    assert any("selecting on an inner split" in m and "not seen until eval" in m for m in inner_run.log)
    assert any("on the inner selection splits (not an OOF score)" in m for m in inner_run.log)


def test_fold_selection_is_the_reference_and_says_it_is_optimistic(default_run):
    (trainer,) = default_run.trainers
    assert len(trainer.val_df) == 30 - N_TRAIN_FOLD0
    assert default_run.summary["selected_on"] == "fold"
    assert any("on the scored folds themselves: optimistic" in m for m in default_run.log)


def resolve(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_robust_recipe_fills_in_its_bundle_and_explicit_options_win():
    robust = resolve("--recipe", "robust", "--freeze-backbone").to_dict()
    reference = resolve("--freeze-backbone").to_dict()
    assert reference["recipe"] == "reference" and robust["recipe"] == "robust"
    flat = {k: v for part in robust.values() if isinstance(part, dict) for k, v in part.items()}
    flat_ref = {k: v for part in reference.values() if isinstance(part, dict) for k, v in part.items()}
    for dest, value in RECIPE_DEFAULTS["robust"].items():
        key = {"no_film": "film", "no_attention_pool": "attention_pool"}.get(dest, dest)
        expected = (not value) if key != dest else value
        assert flat[key] == (list(expected) if isinstance(expected, tuple) else expected), dest
        assert flat_ref[key] != flat[key], f"{dest}: the robust recipe must change the reference's value"
    explicit = resolve("--recipe", "robust", "--select-on", "fold", "--freeze-backbone", "--use-log-target").to_dict()
    assert explicit["train"]["select_on"] == "fold"
    assert not explicit["train"]["refit"]  # the refit retrains to the epoch chosen on an inner split: none here
    assert explicit["loss"]["target_transform"] is None and explicit["loss"]["use_log_target"]  # log1p, as asked
    # the ridge is fitted on frozen features: without --freeze-backbone the recipe leaves it off
    fine_tuning = resolve("--recipe", "robust").to_dict()
    assert not fine_tuning["model"]["ridge_base"] and fine_tuning["train"]["select_on"] == "inner"
    assert fine_tuning["train"]["refit"]
    with pytest.raises(ConfigError, match="--refit needs --select-on inner"):
        resolve("--refit")


def test_recipe_cannot_be_given_with_resume(tmp_path, caplog):
    from biomass5head.cli.train import main

    (tmp_path / "run").mkdir()
    assert main(["--resume", str(tmp_path / "run"), "--recipe", "robust"]) == 2
    assert "--recipe cannot be given with it" in caplog.text
