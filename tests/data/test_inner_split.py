"""`data.folds.inner_split`: the split of a fold's training images that `--select-on inner` selects on and the ridge
probe chooses its alpha on: grouped like the outer strategy, about --inner-frac of the images, seeded."""
from __future__ import annotations

import numpy as np
import pytest
from test_folds import synthetic_frame

from biomass5head.constants import CV_STRATEGIES
from biomass5head.data.folds import FoldError, inner_parts, inner_split, make_folds, scored_parts

GROUP_COLUMN = {"group_month": "month", "group_date": "Sampling_Date", "group_date_state": "month",
                "group_date_state_bin": "month"}


@pytest.fixture(scope="module")
def training_fold():
    """The training images of fold 0 of group_month (the outer split), as kfold hands them over."""
    df = synthetic_frame(200)
    folds = make_folds(df, "group_month", 5, 18)
    return df[folds != 0]


@pytest.mark.parametrize("strategy", CV_STRATEGIES)
def test_holds_out_about_the_fraction_and_keeps_groups_whole(training_fold, strategy):
    held = inner_split(training_fold, strategy, 0.2, seed=118)
    assert held.dtype == bool and held.shape == (len(training_fold),)
    assert 0.08 < held.mean() < 0.35  # 1/5 of the images up to the sizes of the groups
    column = GROUP_COLUMN.get(strategy)
    if column:
        assert not set(training_fold[column][held]) & set(training_fold[column][~held])


@pytest.mark.parametrize("strategy", ["group_date", "random"])
def test_seeded_and_depends_on_the_seed(training_fold, strategy):
    # (with a handful of month groups, StratifiedGroupKFold's balancing leaves the seed little to choose)
    a = inner_split(training_fold, strategy, 0.2, seed=1)
    np.testing.assert_array_equal(a, inner_split(training_fold, strategy, 0.2, seed=1))
    assert any(not np.array_equal(a, inner_split(training_fold, strategy, 0.2, seed=s)) for s in range(2, 6))


def test_fraction_sets_the_number_of_parts(training_fold):
    quarter = inner_split(training_fold, "random", 0.25, seed=0)
    half = inner_split(training_fold, "random", 0.5, seed=0)
    assert quarter.sum() in (len(training_fold) // 4, len(training_fold) // 4 + 1)
    assert half.sum() in (len(training_fold) // 2, len(training_fold) // 2 + 1)


def test_one_group_falls_back_to_a_stratified_split_of_images(training_fold):
    one_month = training_fold.assign(month=5)
    held = inner_split(one_month, "group_month", 0.2, seed=0)
    assert 0 < held.sum() < len(one_month)


def test_bad_fraction_and_too_few_images(training_fold):
    with pytest.raises(FoldError, match="--inner-frac must be in"):
        inner_split(training_fold, "group_month", 1.0, seed=0)
    with pytest.raises(FoldError, match="cannot hold out an inner split of 3 training images"):
        inner_split(training_fold.iloc[:3], "random", 0.2, seed=0)


@pytest.mark.parametrize("strategy", CV_STRATEGIES)
def test_inner_parts_cover_every_image_once_and_part_0_is_the_inner_split(training_fold, strategy):
    parts = inner_parts(training_fold, strategy, 0.2, seed=118)
    assert parts.shape == (len(training_fold),) and parts.min() == 0 and 2 <= parts.max() + 1 <= 5
    np.testing.assert_array_equal(parts == 0, inner_split(training_fold, strategy, 0.2, seed=118))
    column = GROUP_COLUMN.get(strategy)
    if column:  # a group lies in one part
        assert training_fold.groupby(column).apply(lambda g: parts[training_fold.index.get_indexer(g.index)]
                                                   .tolist()).map(lambda p: len(set(p))).max() == 1


def test_scored_parts_leave_out_parts_too_small_to_score():
    assert scored_parts(np.array([0, 0, 1, 2, 2, 2, 4, 4])) == [0, 2, 4]  # part 1 has one image, part 3 none
    with pytest.raises(FoldError, match="no inner part of the 3 training images has 2 images to score"):
        scored_parts(np.array([0, 1, 2]))
