"""Tests of data/folds.py: the six CV strategies, reading a fold CSV and writing folds.csv."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biomass5head.constants import MONTHS, STATES, TARGETS
from biomass5head.data.folds import (
    CV_STRATEGIES,
    FoldError,
    fold_summary,
    make_folds,
    read_fold_csv,
    target_bins,
    write_folds,
)

NUM_FOLDS = 5


def synthetic_frame(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """One row per image as biomass5head.data.tables.load_train makes it: random dates over the 10 months, 4 States."""
    rng = np.random.default_rng(seed)
    months = rng.choice(MONTHS, size=n)
    days = rng.integers(1, 28, size=n)
    # Two sampling days per month at most, so dates are groups smaller than months.
    days = np.where(days < 14, 3, 17)
    targets = rng.gamma(2.0, 10.0, size=(n, len(TARGETS)))
    df = pd.DataFrame({
        "sample_id_prefix": [f"ID{1000 + i}" for i in range(n)],
        "Sampling_Date": [f"2015/{m}/{d}" for m, d in zip(months, days, strict=True)],
        "State": rng.choice(STATES, size=n),
        "Species": rng.choice(["Ryegrass", "Clover", "Phalaris"], size=n),
        "month": months.astype(int),
    })
    for k, name in enumerate(TARGETS):
        df[name] = targets[:, k]
    return df.sort_values("sample_id_prefix").reset_index(drop=True)


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return synthetic_frame()


@pytest.mark.parametrize("strategy", CV_STRATEGIES)
def test_every_image_in_one_nonempty_fold(df, strategy):
    folds = make_folds(df, strategy, NUM_FOLDS, seed=18)
    assert folds.shape == (len(df),)
    assert np.issubdtype(folds.dtype, np.integer)
    assert set(folds.tolist()) == set(range(NUM_FOLDS))
    assert np.bincount(folds, minlength=NUM_FOLDS).min() > 0


@pytest.mark.parametrize("strategy", CV_STRATEGIES)
def test_deterministic_for_a_seed(df, strategy):
    np.testing.assert_array_equal(make_folds(df, strategy, NUM_FOLDS, 7), make_folds(df, strategy, NUM_FOLDS, 7))


@pytest.mark.parametrize("strategy", ["stratified", "random"])
def test_another_seed_gives_other_folds(df, strategy):
    # StratifiedGroupKFold's shuffle only breaks ties between groups, so for the group strategies a new
    # seed may legitimately give the same folds; row-level splits must change.
    assert (make_folds(df, strategy, NUM_FOLDS, 0) != make_folds(df, strategy, NUM_FOLDS, 1)).any()


@pytest.mark.parametrize(("strategy", "column"), [
    ("group_month", "month"), ("group_date", "Sampling_Date"),
    ("group_date_state", "month"), ("group_date_state_bin", "month"),
])
def test_groups_never_split(df, strategy, column):
    for seed in (0, 1, 18):
        folds = make_folds(df, strategy, NUM_FOLDS, seed)
        per_group = pd.Series(folds).groupby(df[column].to_numpy()).nunique()
        assert (per_group == 1).all(), per_group[per_group > 1]


def test_group_month_works_without_month_column(df):
    folds = make_folds(df.drop(columns="month"), "group_month", NUM_FOLDS, 0)
    np.testing.assert_array_equal(folds, make_folds(df, "group_month", NUM_FOLDS, 0))


def test_stratified_balances_target_bins(df):
    bins = target_bins(df)
    assert sorted(set(bins.tolist())) == [0, 1, 2, 3]
    folds = make_folds(df, "stratified", NUM_FOLDS, seed=3)
    table = pd.crosstab(folds, bins)  # 120 images, 30 per bin -> 6 of each bin per fold
    assert (table.to_numpy() >= 5).all() and (table.to_numpy() <= 7).all(), table


def test_group_date_state_keeps_states_in_every_fold():
    df = synthetic_frame(n=400, seed=1)
    folds = make_folds(df, "group_date_state", NUM_FOLDS, seed=0)
    share = pd.crosstab(folds, df["State"], normalize="index")
    overall = df["State"].value_counts(normalize=True)
    assert set(share.columns) == set(STATES)
    assert (share.sub(overall, axis=1).abs().to_numpy() < 0.15).all(), share


def test_target_bins_with_repeated_values(df):
    tied = df.assign(Dry_Total_g=np.r_[np.zeros(90), np.arange(30.0)])
    bins = target_bins(tied)  # three quartile edges coincide at 0 -> fewer bins, no error
    assert bins.min() == 0 and len(set(bins.tolist())) < 4
    assert set(target_bins(df.assign(Dry_Total_g=5.0)).tolist()) == {0}
    for strategy in CV_STRATEGIES:
        assert len(set(make_folds(tied, strategy, NUM_FOLDS, 0).tolist())) == NUM_FOLDS


def test_fewer_groups_than_folds(df):
    few = df[df["month"].isin([1, 2, 4])]
    with pytest.raises(FoldError, match=r"group_month.*only 3 distinct.*5 folds"):
        make_folds(few, "group_month", NUM_FOLDS, 0)
    with pytest.raises(FoldError, match=r"group_date'.*Sampling_Date"):
        make_folds(few[few["Sampling_Date"].str.endswith("/3")], "group_date", NUM_FOLDS, 0)


@pytest.mark.parametrize(("strategy", "folds", "n", "message"), [
    ("kfold", 5, 120, "unknown CV strategy 'kfold'"),
    ("random", 1, 120, "num_folds must be an integer >= 2"),
    ("random", 5, 3, "cannot split 3 images into 5 folds"),
])
def test_bad_requests(df, strategy, folds, n, message):
    with pytest.raises(FoldError, match=message):
        make_folds(df.head(n), strategy, folds, 0)


def test_stratified_too_small_is_fold_error(df):
    with pytest.raises(FoldError, match="stratified"):
        make_folds(df.head(5), "stratified", NUM_FOLDS, 0)  # 4 bins of 1-2 images cannot fill 5 folds


def test_fold_summary_lists_every_fold(df):
    text = fold_summary(df, make_folds(df, "group_month", NUM_FOLDS, 0))
    assert len(text.splitlines()) == NUM_FOLDS + 1
    assert "mean Total" in text and "NSW:" in text


# --- read_fold_csv / write_folds ------------------------------------------------------------------------


def write_table(tmp_path, rows: pd.DataFrame, name: str = "folds.csv"):
    path = tmp_path / name
    rows.to_csv(path, index=False)
    return path


@pytest.fixture()
def fold_table(df) -> pd.DataFrame:
    """A fold file in the shape of the real trainfold.csv: extra columns, rows in another order."""
    table = df[["sample_id_prefix", "Sampling_Date", "State"]].copy()
    table["fold"] = np.arange(len(df)) % NUM_FOLDS
    table["total_bin"] = 1
    return table.iloc[::-1].reset_index(drop=True)


def test_read_fold_csv_happy_path(tmp_path, df, fold_table):
    folds = read_fold_csv(write_table(tmp_path, fold_table), df, NUM_FOLDS)
    np.testing.assert_array_equal(folds, np.arange(len(df)) % NUM_FOLDS)


def test_write_then_read_round_trip(tmp_path, df):
    folds = make_folds(df, "group_date_state_bin", NUM_FOLDS, 18)
    path = tmp_path / "run" / "folds.csv"
    write_folds(path, df, folds)
    assert path.read_text().splitlines()[0] == "sample_id_prefix,fold"
    assert pd.read_csv(path)["sample_id_prefix"].tolist() == df["sample_id_prefix"].tolist()
    assert [p.name for p in path.parent.iterdir()] == ["folds.csv"]  # no temporary file left behind
    np.testing.assert_array_equal(read_fold_csv(path, df, NUM_FOLDS), folds)
    shuffled = df.sample(frac=1.0, random_state=0)
    np.testing.assert_array_equal(read_fold_csv(path, shuffled, NUM_FOLDS), folds[shuffled.index])


def test_write_folds_rejects_wrong_length(tmp_path, df):
    with pytest.raises(FoldError, match="folds for 120 images"):
        write_folds(tmp_path / "folds.csv", df, np.zeros(3, dtype=int))


def test_missing_columns(tmp_path, df, fold_table):
    path = write_table(tmp_path, fold_table.drop(columns="fold"))
    with pytest.raises(FoldError, match=r"folds\.csv lacks column\(s\) fold"):
        read_fold_csv(path, df, NUM_FOLDS)


def test_missing_file(tmp_path, df):
    with pytest.raises(FoldError, match="nowhere.csv does not exist"):
        read_fold_csv(tmp_path / "nowhere.csv", df, NUM_FOLDS)


def test_image_missing_from_file(tmp_path, df, fold_table):
    table = fold_table[~fold_table["sample_id_prefix"].isin(["ID1003", "ID1007"])]
    with pytest.raises(FoldError, match=r"folds\.csv(.|\n)*2 training image\(s\) not in the file: ID1003, ID1007"):
        read_fold_csv(write_table(tmp_path, table), df, NUM_FOLDS)


def test_unknown_ids_listed_and_truncated(tmp_path, df, fold_table):
    extra = pd.DataFrame({"sample_id_prefix": [f"IDX{i:02d}" for i in range(15)], "fold": 0})
    path = write_table(tmp_path, pd.concat([fold_table, extra]))
    expected = r"15 id\(s\) not among the training images: IDX00, (.*)IDX09 \.\.\. \(\+5 more\)"
    with pytest.raises(FoldError, match=expected):
        read_fold_csv(path, df, NUM_FOLDS)


def test_duplicated_id(tmp_path, df, fold_table):
    path = write_table(tmp_path, pd.concat([fold_table, fold_table[fold_table["sample_id_prefix"] == "ID1010"]]))
    with pytest.raises(FoldError, match=r"1 duplicated id\(s\): ID1010"):
        read_fold_csv(path, df, NUM_FOLDS)


def test_non_integer_folds(tmp_path, df, fold_table):
    table = fold_table.astype({"fold": object})
    table.loc[table["sample_id_prefix"] == "ID1001", "fold"] = "1.5"
    table.loc[table["sample_id_prefix"] == "ID1002", "fold"] = ""
    table.loc[table["sample_id_prefix"] == "ID1004", "fold"] = "2.0"  # integral: accepted
    with pytest.raises(FoldError, match=r"2 non-integer fold value\(s\): ID1002='', ID1001='1.5'"):
        read_fold_csv(write_table(tmp_path, table), df, NUM_FOLDS)


def test_folds_out_of_range(tmp_path, df, fold_table):
    table = fold_table.copy()
    table.loc[table["sample_id_prefix"] == "ID1005", "fold"] = 5
    table.loc[table["sample_id_prefix"] == "ID1006", "fold"] = -1
    with pytest.raises(FoldError, match=r"2 fold value\(s\) outside \[0, 5\): ID1006=-1, ID1005=5"):
        read_fold_csv(write_table(tmp_path, table), df, NUM_FOLDS)


def test_empty_fold(tmp_path, df, fold_table):
    table = fold_table.assign(fold=fold_table["fold"].replace(3, 2))
    with pytest.raises(FoldError, match=r"fold\(s\) 3 have no images"):
        read_fold_csv(write_table(tmp_path, table), df, NUM_FOLDS)


def test_all_problems_reported_together(tmp_path, df, fold_table):
    table = fold_table[fold_table["sample_id_prefix"] != "ID1000"].copy()
    table.loc[table["sample_id_prefix"] == "ID1001", "fold"] = 9
    with pytest.raises(FoldError) as info:
        read_fold_csv(write_table(tmp_path, table), df, NUM_FOLDS)
    assert "not in the file: ID1000" in str(info.value) and "ID1001=9" in str(info.value)
