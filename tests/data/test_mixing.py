"""Constrained MixUp / CutMix: partners, lambda math, shared box, target identities, probabilities."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biomass5head.constants import CLOVER, DEAD, GDM, GREEN, TOTAL
from biomass5head.data.mixing import PairMixer, build_partner_index, cutmix_views, mixup_views, sample_lambda


def frame() -> pd.DataFrame:
    return pd.DataFrame({
        "Species": ["Ryegrass", "Ryegrass", "Ryegrass", "Ryegrass", "Clover", "Ryegrass", "Clover"],
        "month": [5, 5, 5, 6, 5, 5, 5],
        "State": ["Vic", "Vic", "NSW", "Vic", "Vic", "Vic", None],
    }, index=[10, 11, 12, 13, 14, 15, 16])  # a non-default index: partners are positions, not labels


def consistent_targets(rng: np.random.Generator) -> np.ndarray:
    green, dead, clover = rng.uniform(0, 100, 3)
    out = np.zeros(5)
    out[[GREEN, DEAD, CLOVER]] = green, dead, clover
    out[GDM], out[TOTAL] = green + clover, green + dead + clover
    return out


def random_views(seed: int, shape=(28, 56)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(2))


def test_partners_share_species_month_state_and_exclude_self():
    df = frame()
    partners = build_partner_index(df)
    assert len(partners) == len(df)
    for i, js in enumerate(partners):
        assert i not in js
        for j in js:
            for key in ("Species", "month", "State"):
                assert df.iloc[i][key] == df.iloc[j][key]
    assert sorted(partners[0]) == [1, 5] and sorted(partners[5]) == [0, 1]
    for lonely in (2, 3, 4, 6):  # other State, other month, other Species, missing State
        assert len(partners[lonely]) == 0


def test_partner_index_needs_columns():
    with pytest.raises(ValueError, match="State"):
        build_partner_index(frame().drop(columns="State"))


def test_sample_lambda_in_unit_interval_and_mean():
    rng = np.random.default_rng(0)
    lams = np.array([sample_lambda(0.4, rng) for _ in range(2000)])
    assert ((lams >= 0) & (lams <= 1)).all()
    assert abs(lams.mean() - 0.5) < 0.05
    with pytest.raises(ValueError):
        sample_lambda(0.0, rng)


def test_mixup_pixel_math():
    a = (np.full((4, 6, 3), 200, np.uint8), np.full((4, 6, 3), 10, np.uint8))
    b = (np.full((4, 6, 3), 100, np.uint8), np.full((4, 6, 3), 250, np.uint8))
    left, right = mixup_views(a, b, 0.25)
    assert left.dtype == np.uint8 and right.dtype == np.uint8
    assert (left == 125).all() and (right == 190).all()
    assert np.array_equal(mixup_views(a, b, 1.0)[0], a[0]) and np.array_equal(mixup_views(a, b, 0.0)[1], b[1])


def test_cutmix_same_box_on_both_views_and_area_fraction():
    rng = np.random.default_rng(3)
    shape = (28, 56, 3)
    a = (np.zeros(shape, np.uint8), np.full(shape, 1, np.uint8))
    b = (np.full(shape, 255, np.uint8), np.full(shape, 254, np.uint8))
    for lam in (0.1, 0.5, 0.8, 0.95):
        (left, right), lam_area = cutmix_views(a, b, lam, rng)
        from_b_left, from_b_right = left == 255, right == 254
        assert np.array_equal(from_b_left, from_b_right)  # same box in both views
        assert lam_area == pytest.approx(1.0 - from_b_left.all(axis=2).mean())
        rows, cols = np.nonzero(from_b_left.all(axis=2))
        if rows.size:  # one rectangle
            assert from_b_left[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert np.array_equal(a[0], np.zeros(shape, np.uint8))  # inputs not modified


def test_cutmix_area_follows_lambda_on_average():
    rng = np.random.default_rng(4)
    a, b = random_views(0, (64, 64)), random_views(1, (64, 64))
    areas = [cutmix_views(a, b, 0.7, rng)[1] for _ in range(300)]
    # Boxes clipped at the border paste less, so lam_area >= lam on average.
    assert 0.7 <= np.mean(areas) < 0.85


def make_loader(views_by_j, targets_by_j):
    return lambda j: (views_by_j[j], targets_by_j[j])


def test_no_partner_means_no_mix():
    views, targets = random_views(0), consistent_targets(np.random.default_rng(0))
    mixer = PairMixer(mixup_prob=1.0, cutmix_prob=1.0, partners=build_partner_index(frame()), seed=0)

    def fail(j):
        raise AssertionError("load_fn must not be called without a partner")

    out_views, out_targets, info = mixer(2, views, targets, fail)
    assert out_views is views and out_targets is targets
    assert info == {"mix": "none", "partner": -1, "lam": 1.0}
    assert PairMixer(mixup_prob=1.0, partners=None)(0, views, targets, fail)[2]["mix"] == "none"


def test_disabled_mixer_is_identity():
    mixer = PairMixer(partners=build_partner_index(frame()), seed=0)
    assert not mixer.enabled and PairMixer(cutmix_prob=0.1).enabled
    views, targets = random_views(0), np.arange(5.0)
    assert mixer(0, views, targets, make_loader({}, {}))[2]["mix"] == "none"


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_targets_keep_identities_and_follow_lambda(kind):
    rng = np.random.default_rng(5)
    partners = build_partner_index(frame())
    views_by_j = {j: random_views(j) for j in range(7)}
    targets_by_j = {j: consistent_targets(rng) for j in range(7)}
    mixer = PairMixer(mixup_prob=1.0 if kind == "mixup" else 0.0, cutmix_prob=1.0, partners=partners, seed=1)
    for _ in range(20):
        (left, right), targets, info = mixer(0, views_by_j[0], targets_by_j[0], make_loader(views_by_j, targets_by_j))
        assert info["mix"] == kind and info["partner"] in (1, 5)
        lam, j = info["lam"], info["partner"]
        assert left.shape == views_by_j[0][0].shape and left.dtype == np.uint8 and right.dtype == np.uint8
        np.testing.assert_allclose(targets, lam * targets_by_j[0] + (1 - lam) * targets_by_j[j])
        np.testing.assert_allclose(targets[GDM], targets[GREEN] + targets[CLOVER])
        np.testing.assert_allclose(targets[TOTAL], targets[GREEN] + targets[DEAD] + targets[CLOVER])
        if kind == "cutmix":
            from_a = (left == views_by_j[0][0]).all(axis=2) & ~(left == views_by_j[j][0]).all(axis=2)
            from_b = ~(left == views_by_j[0][0]).all(axis=2) & (left == views_by_j[j][0]).all(axis=2)
            # Random views almost never agree on a whole pixel, so each pixel shows which image it came from.
            assert from_a.mean() + from_b.mean() > 0.99 and abs(from_a.mean() - lam) < 0.01


def test_probabilities_roughly_respected():
    partners = build_partner_index(frame())
    views, targets = random_views(0, (8, 8)), np.arange(5.0)
    loader = make_loader({j: random_views(j, (8, 8)) for j in range(7)}, {j: np.arange(5.0) for j in range(7)})
    mixer = PairMixer(mixup_prob=0.3, cutmix_prob=0.5, partners=partners, seed=2)  # no mix the other 20%
    kinds = [mixer(1, views, targets, loader)[2]["mix"] for _ in range(2000)]
    assert abs(kinds.count("mixup") / 2000 - 0.3) < 0.04
    assert abs(kinds.count("cutmix") / 2000 - 0.5) < 0.04  # --cutmix-prob is CutMix's own probability
    picked = {mixer(1, views, targets, loader)[2]["partner"] for _ in range(200)} - {-1}
    assert picked == {0, 5}


def test_same_seed_same_mixing():
    partners = build_partner_index(frame())
    views_by_j = {j: random_views(j) for j in range(7)}
    loader = make_loader(views_by_j, {j: np.full(5, float(j)) for j in range(7)})

    def run(mixer):
        return [mixer(0, views_by_j[0], np.zeros(5), loader) for _ in range(10)]

    a = run(PairMixer(0.3, 0.4, 0.5, 1.0, partners, seed=8))
    b = run(PairMixer(0.3, 0.4, 0.5, 1.0, partners, seed=8))
    assert [x[2] for x in a] == [y[2] for y in b]
    assert all(np.array_equal(x[0][0], y[0][0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    mixer = PairMixer(0.3, 0.4, 0.5, 1.0, partners, seed=1)
    run(mixer)
    mixer.reseed(8)
    assert [x[2] for x in run(mixer)] == [x[2] for x in a]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mixup_prob"):
        PairMixer(mixup_prob=-0.1)
    with pytest.raises(ValueError, match="cutmix_alpha"):
        PairMixer(cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="shape"):
        mixup_views(random_views(0, (8, 8)), random_views(1, (8, 16)), 0.5)
