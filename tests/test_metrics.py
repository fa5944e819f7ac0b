"""Tests of metrics.py: the global weighted R2 and the per-target scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import r2_score

from biomass5head.constants import COMPETITION_WEIGHTS, TARGETS
from biomass5head.metrics import compute_metrics, format_metrics_table, weighted_r2


def random_case(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.gamma(2.0, 15.0, size=(n, 5)) * np.array([1, 0.5, 0.3, 1.3, 2.0])
    return y, y + rng.normal(0, 8.0, size=y.shape)


def test_hand_computed_case():
    # Two images; the error is only in Total (weight 0.5) of the first image.
    y = np.array([[1.0, 0.0, 0.0, 1.0, 2.0],
                  [3.0, 0.0, 0.0, 3.0, 4.0]])
    p = y.copy()
    p[0, 4] = 3.0
    # sum w = 2 * (0.1 + 0.1 + 0.1 + 0.2 + 0.5) = 2.0
    # sum w y = 0.1*(1+3) + 0.2*(1+3) + 0.5*(2+4) = 0.4 + 0.8 + 3.0 = 4.2  ->  ybar_w = 2.1
    # SS_tot = 0.1*(1.21 + 0.81) + 0.1*(4.41 + 4.41) + 0.1*(4.41 + 4.41) + 0.2*(1.21 + 0.81) + 0.5*(0.01 + 3.61)
    #        = 0.202 + 0.882 + 0.882 + 0.404 + 1.81 = 4.18
    # SS_res = 0.5 * (2 - 3)^2 = 0.5  ->  R2_w = 1 - 0.5 / 4.18
    assert weighted_r2(y, p) == pytest.approx(1 - 0.5 / 4.18, rel=1e-12)
    m = compute_metrics(y, p)
    # Total: mean 3, SS_tot = 2, SS_res = 1 -> R2 0.5; RMSE sqrt(1/2); MAE 1/2. Other targets exact.
    assert m["per_target"]["Dry_Total_g"] == pytest.approx({"r2": 0.5, "rmse": np.sqrt(0.5), "mae": 0.5})
    # Dead and Clover are all 0 and predicted exactly: constant truth, exact prediction -> 1.0.
    assert m["per_target"]["Dry_Dead_g"]["r2"] == 1.0
    # weighted mean of per-target R2 = (0.1 + 0.1 + 0.1 + 0.2 + 0.5 * 0.5) / 1.0 = 0.75
    assert m["weighted_r2_mean_per_target"] == pytest.approx(0.75)
    assert m["n_images"] == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn_flattened_sample_weight(seed):
    y, p = random_case(seed=seed)
    w = np.tile(COMPETITION_WEIGHTS, len(y))
    expected = r2_score(y.ravel(), p.ravel(), sample_weight=w)
    assert weighted_r2(y, p) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    custom = (1.0, 0.0, 2.0, 0.5, 0.5)
    expected = r2_score(y.ravel(), p.ravel(), sample_weight=np.tile(custom, len(y)))
    assert weighted_r2(y, p, weights=custom) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_per_target_against_numpy_and_sklearn():
    y, p = random_case(seed=5)
    m = compute_metrics(y, p)
    for k, name in enumerate(TARGETS):
        row = m["per_target"][name]
        assert row["r2"] == pytest.approx(r2_score(y[:, k], p[:, k]), rel=1e-12)
        assert row["rmse"] == pytest.approx(np.sqrt(np.mean((y[:, k] - p[:, k]) ** 2)), rel=1e-12)
        assert row["mae"] == pytest.approx(np.mean(np.abs(y[:, k] - p[:, k])), rel=1e-12)
    w = np.asarray(COMPETITION_WEIGHTS)
    r2s = np.array([m["per_target"][t]["r2"] for t in TARGETS])
    assert m["weighted_r2_mean_per_target"] == pytest.approx(np.sum(w * r2s) / np.sum(w))
    assert m["weighted_r2"] == pytest.approx(weighted_r2(y, p))


def test_perfect_prediction_is_one():
    y, _ = random_case()
    m = compute_metrics(y, y.copy())
    assert m["weighted_r2"] == 1.0 and m["weighted_r2_mean_per_target"] == 1.0
    assert all(row == {"r2": 1.0, "rmse": 0.0, "mae": 0.0} for row in m["per_target"].values())


def test_weighted_mean_prediction_scores_zero():
    y, _ = random_case(seed=3)
    w = np.broadcast_to(COMPETITION_WEIGHTS, y.shape)
    ybar = np.sum(w * y) / np.sum(w)
    assert weighted_r2(y, np.full_like(y, ybar)) == pytest.approx(0.0, abs=1e-12)
    # Per-target means are better than one global mean: every target's R2 is 0, the global one above 0.
    m = compute_metrics(y, np.broadcast_to(y.mean(axis=0), y.shape))
    assert m["weighted_r2_mean_per_target"] == pytest.approx(0.0, abs=1e-12)
    assert m["weighted_r2"] > 0.0


def test_constant_truth_column_follows_force_finite():
    y, p = random_case(seed=4)
    y[:, 2] = 0.0  # e.g. a fold without any clover
    m = compute_metrics(y, p)
    assert m["per_target"]["Dry_Clover_g"]["r2"] == 0.0
    assert m["per_target"]["Dry_Clover_g"]["r2"] == r2_score(y[:, 2], p[:, 2], force_finite=True)


def test_json_serialisable_plain_types():
    y, p = random_case()
    m = compute_metrics(y.tolist(), p.tolist())
    assert json.loads(json.dumps(m)) == m
    assert type(m["weighted_r2"]) is float and type(m["n_images"]) is int
    assert all(type(v) is float for row in m["per_target"].values() for v in row.values())
    assert list(m["per_target"]) == list(TARGETS)


@pytest.mark.parametrize(("true_shape", "pred_shape", "message"), [
    ((10, 4), (10, 4), r"y_true must have shape \(N, 5\)"),
    ((10,), (10,), r"y_true must have shape \(N, 5\)"),
    ((10, 5), (9, 5), r"same shape"),
    ((10, 5), (10, 5, 1), r"y_pred must have shape"),
    ((1, 5), (1, 5), r"at least 2 images"),
])
def test_shape_errors(true_shape, pred_shape, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(np.ones(true_shape), np.ones(pred_shape))
    with pytest.raises(ValueError, match=message):
        weighted_r2(np.ones(true_shape), np.ones(pred_shape))


def test_non_finite_and_bad_weights():
    y, p = random_case()
    p[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"y_pred has non-finite values in 1 row\(s\), e.g. rows \[3\]"):
        compute_metrics(y, p)
    with pytest.raises(ValueError, match="weights must be 5"):
        weighted_r2(y, y, weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="weights must be 5"):
        weighted_r2(y, y, weights=(0, 0, 0, 0, 0))


def test_format_metrics_table():
    y, p = random_case()
    m = compute_metrics(y, p)
    text = format_metrics_table(m)
    assert "weighted R2 (global, primary)" in text and "weighted mean of per-target R2" in text
    assert all(name in text for name in TARGETS)
    assert f"{m['weighted_r2']:.4f}" in text
    assert len({len(line) for line in text.splitlines()[:6]}) == 1  # fixed-width target rows
