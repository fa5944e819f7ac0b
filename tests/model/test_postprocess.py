"""Post-processing: Dead correction, derive-dead, context ratios and adjustment, reconciliation."""
import numpy as np
import pandas as pd
import pytest

from biomass5head.constants import CLOVER, COMPETITION_WEIGHTS, DEAD, GDM, GREEN, IGNORE_INDEX, TARGETS, TOTAL
from biomass5head.metrics import compute_metrics
from biomass5head.model.postprocess import (
    apply_context_adjustment,
    apply_postprocess,
    compute_context_ratios,
    context_factors,
    correct_dead,
    derive_dead,
    reconcile_targets,
)

N_CLASSES = {"state": 4, "month": 10, "species": 8}


def _pred():
    # Green, Dead, Clover, GDM, Total
    return np.array([
        [10.0, 5.0, 5.0, 15.0, 20.0],   # consistent: Total = 20 = 10 + 5 + 5 -> mismatch 0
        [10.0, 1.0, 5.0, 15.0, 20.0],   # sum 16, |20 - 16| / 20 = 0.20 > 0.15 -> Dead = 20 - 15 = 5
        [10.0, 3.0, 5.0, 15.0, 20.0],   # sum 18, 0.10 <= 0.15 -> unchanged
        [10.0, 9.0, 5.0, 25.0, 20.0],   # sum 24, 0.20 -> Dead = max(0, 20 - 25) = 0
        [0.0, 0.0, 0.0, 0.0, 0.0],      # all zero: no correction
        [1.0, 2.0, 0.0, 1.0, 0.0],      # Total 0 with components: infinite mismatch -> Dead = max(0, 0 - 1) = 0
    ])


def test_correct_dead_threshold():
    pred = _pred()
    before = pred.copy()
    out = correct_dead(pred, threshold=0.15)
    np.testing.assert_array_equal(out[:, DEAD], [5.0, 5.0, 3.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.delete(out, DEAD, axis=1), np.delete(before, DEAD, axis=1))
    np.testing.assert_array_equal(pred, before)  # input untouched


def test_correct_dead_threshold_edges():
    out = correct_dead(_pred(), threshold=0.25)  # row 1 and 3 now below threshold
    np.testing.assert_array_equal(out[:, DEAD], [5.0, 1.0, 3.0, 9.0, 0.0, 0.0])
    out = correct_dead(_pred(), threshold=0.0)  # anything inconsistent
    np.testing.assert_array_equal(out[:, DEAD], [5.0, 5.0, 5.0, 0.0, 0.0, 0.0])


def test_correct_dead_always_and_none():
    expected = np.maximum(_pred()[:, 4] - _pred()[:, 3], 0)
    np.testing.assert_array_equal(correct_dead(_pred(), threshold=None, always=True)[:, DEAD], expected)
    np.testing.assert_array_equal(correct_dead(_pred(), threshold=0.9, always=True)[:, DEAD], expected)
    np.testing.assert_array_equal(correct_dead(_pred(), threshold=None), _pred())


def test_correct_dead_leaves_nan_rows():
    pred = np.array([[np.nan, 1.0, 1.0, 1.0, 5.0]])
    assert correct_dead(pred, threshold=0.1)[0, DEAD] == 1.0


def test_derive_dead_clamps_at_zero():
    pred = _pred()
    out = derive_dead(pred)
    np.testing.assert_array_equal(out[:, DEAD], [5.0, 5.0, 5.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(pred, _pred())
    assert out.dtype == np.float64


def test_rejects_wrong_shape():
    with pytest.raises(ValueError):
        derive_dead(np.zeros((3, 4)))


def _train_frame():
    return pd.DataFrame({
        "Dry_Dead_g": [10.0, 30.0, 20.0, 0.0],
        "Dry_Clover_g": [4.0, 0.0, 8.0, 100.0],
        "state_idx": [0, 0, 1, IGNORE_INDEX],
        "month_idx": [2, 3, 3, 3],
        "species_idx": [0, 1, 1, 1],
    })


def test_context_ratios_by_hand():
    r = compute_context_ratios(_train_frame())
    assert set(r) == {"Dry_Dead_g", "Dry_Clover_g"}
    dead, clover = r["Dry_Dead_g"], r["Dry_Clover_g"]
    assert {k: len(v) for k, v in dead.items()} == N_CLASSES
    # state: the IGNORE row is skipped, labelled mean of Dead = 20; class 0 mean 20, class 1 mean 20.
    np.testing.assert_allclose(dead["state"], [1.0, 1.0, 1.0, 1.0])
    # Clover state: labelled mean = 4; class 0 mean 2 -> 0.5, class 1 mean 8 -> 2.
    np.testing.assert_allclose(clover["state"], [0.5, 2.0, 1.0, 1.0])
    # month: global mean Dead = 15; class 2 -> 10 / 15, class 3 -> (30 + 20 + 0) / 3 / 15; others 1.0.
    expected_month = [1.0] * 10
    expected_month[2], expected_month[3] = 10 / 15, (50 / 3) / 15
    np.testing.assert_allclose(dead["month"], expected_month)
    # species: global mean Clover = 28; class 0 -> 4 / 28, class 1 -> 36 / 28.
    np.testing.assert_allclose(clover["species"][:2], [4 / 28, 36 / 28])
    assert clover["species"][2:] == [1.0] * 6
    assert all(isinstance(x, float) for x in dead["month"])


def test_context_ratios_zero_global_mean_gives_one():
    df = _train_frame()
    df["Dry_Dead_g"] = 0.0
    r = compute_context_ratios(df)
    assert all(v == [1.0] * N_CLASSES[h] for h, v in r["Dry_Dead_g"].items())


def _one_hot(n_rows, head, cls):
    p = np.zeros((n_rows, N_CLASSES[head]))
    p[:, cls] = 1.0
    return p


def _ratios():
    rng = np.random.default_rng(0)
    targets = ("Dry_Dead_g", "Dry_Clover_g")
    return {t: {h: list(rng.uniform(0.5, 2.0, k)) for h, k in N_CLASSES.items()} for t in targets}


def test_adjustment_with_one_hot_probs_is_geometric_mean():
    ratios = _ratios()
    probs = {"state": _one_hot(2, "state", 1), "month": _one_hot(2, "month", 7), "species": _one_hot(2, "species", 3)}
    pred = _pred()[:2]
    before = pred.copy()
    out = apply_context_adjustment(pred, probs, ratios)
    for target, col in (("Dry_Dead_g", DEAD), ("Dry_Clover_g", CLOVER)):
        r = ratios[target]
        factor = (r["state"][1] * r["month"][7] * r["species"][3]) ** (1 / 3)
        np.testing.assert_allclose(out[:, col], before[:, col] * factor)
    untouched = [i for i in range(len(TARGETS)) if i not in (DEAD, CLOVER)]
    np.testing.assert_array_equal(out[:, untouched], before[:, untouched])  # Green, GDM, Total as predicted
    np.testing.assert_array_equal(pred, before)
    for p in probs.values():
        assert p.sum() == 2.0  # probs untouched


def test_adjustment_soft_probs_uses_expected_ratio():
    ratios = _ratios()
    probs = {h: np.full((1, k), 1.0 / k) for h, k in N_CLASSES.items()}
    factors = context_factors(probs, ratios)
    r = ratios["Dry_Dead_g"]
    expected = np.prod([np.mean(r[h]) for h in N_CLASSES]) ** (1 / 3)
    assert factors["Dry_Dead_g"][0] == pytest.approx(expected)


def test_adjustment_all_ones_ratios_is_identity():
    ratios = {t: {h: [1.0] * k for h, k in N_CLASSES.items()} for t in ("Dry_Dead_g", "Dry_Clover_g")}
    probs = {h: np.random.default_rng(1).dirichlet(np.ones(k), size=6) for h, k in N_CLASSES.items()}
    np.testing.assert_allclose(apply_context_adjustment(_pred(), probs, ratios), _pred())


def test_adjustment_rejects_bad_shapes():
    probs = {h: np.full((6, k), 1.0 / k) for h, k in N_CLASSES.items()}
    probs["month"] = np.full((6, 9), 1 / 9)
    with pytest.raises(ValueError):
        apply_context_adjustment(_pred(), probs, _ratios())


def test_apply_postprocess_order():
    ratios = {t: {h: [1.0] * k for h, k in N_CLASSES.items()} for t in ("Dry_Dead_g", "Dry_Clover_g")}
    ratios["Dry_Dead_g"]["state"][0] = 8.0  # factor 2 for Dead of a state-0 image
    probs = {h: _one_hot(1, h, 0) for h in N_CLASSES}
    pred = np.array([[10.0, 2.5, 5.0, 15.0, 20.0]])  # sum 17.5, mismatch 0.125 <= 0.15
    # Context first: Dead 2.5 -> 5.0, now consistent, so the correction changes nothing.
    out = apply_postprocess(pred, correction_threshold=0.15, always_correct_dead=False, context=(probs, ratios))
    np.testing.assert_allclose(out[0], [10.0, 5.0, 5.0, 15.0, 20.0])
    # Without context nothing happens; derive_dead sets Dead = Total - GDM last.
    out = apply_postprocess(pred, correction_threshold=0.15, always_correct_dead=False)
    np.testing.assert_array_equal(out, pred)
    ratios["Dry_Dead_g"]["state"][0] = 1000.0
    out = apply_postprocess(pred, correction_threshold=None, always_correct_dead=False, derive_dead=True,
                            context=(probs, ratios))
    assert out[0, DEAD] == 5.0 and out[0, CLOVER] == 5.0
    out = apply_postprocess(pred, correction_threshold=None, always_correct_dead=True)
    assert out[0, DEAD] == 5.0
    np.testing.assert_array_equal(pred, [[10.0, 2.5, 5.0, 15.0, 20.0]])


def _consistent(out):
    np.testing.assert_allclose(out[:, GDM], out[:, GREEN] + out[:, CLOVER], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out[:, TOTAL], out[:, GREEN] + out[:, DEAD] + out[:, CLOVER], rtol=1e-12, atol=1e-9)


def test_reconcile_is_the_weighted_least_squares_fit_of_the_components():
    rng = np.random.default_rng(0)
    parts = rng.uniform(5, 40, size=(50, 3))
    true = np.column_stack([parts, parts[:, 0] + parts[:, 2], parts.sum(1)])
    pred = true * rng.uniform(0.8, 1.25, size=true.shape)  # each output with its own error: inconsistent rows
    out = reconcile_targets(pred)
    _consistent(out)
    # Each row's (Green, Dead, Clover) minimises sum_i w_i (A x - pred)_i^2: numpy's lstsq on the sqrt-weighted system.
    a = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=float)
    sw = np.sqrt(COMPETITION_WEIGHTS)
    for row, got in zip(pred, out, strict=True):
        x = np.linalg.lstsq(a * sw[:, None], row * sw, rcond=None)[0]
        np.testing.assert_allclose(got[[GREEN, DEAD, CLOVER]], x, rtol=1e-9)
    # Pooling the three estimates of each component lowers the weighted error on these noisy rows.
    assert compute_metrics(true, out)["weighted_r2"] > compute_metrics(true, pred)["weighted_r2"]
    np.testing.assert_allclose(reconcile_targets(true), true, rtol=1e-12)  # a consistent row is kept
    np.testing.assert_allclose(reconcile_targets(out), out, rtol=1e-12)  # so reconciling twice changes nothing


def test_reconcile_sets_negative_components_to_zero_and_keeps_nan_rows():
    pred = np.array([[10.0, 0.0, 0.0, 12.0, 8.0],  # Total below GDM: Dead's fit is negative
                     [np.nan, 1.0, 2.0, 3.0, 4.0]])
    out = reconcile_targets(pred)
    assert out[0, DEAD] == 0.0 and out[0, GREEN] > 0
    _consistent(out[:1])
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(pred[0], [10.0, 0.0, 0.0, 12.0, 8.0])  # the input is not modified


def test_apply_postprocess_reconciles_before_the_dead_correction():
    pred = np.array([[10.0, 2.0, 5.0, 15.0, 30.0]])  # mismatch 13/30: the Dead correction alone would set Dead 15
    corrected = apply_postprocess(pred, correction_threshold=0.15, always_correct_dead=False)
    assert corrected[0, DEAD] == 15.0
    out = apply_postprocess(pred, correction_threshold=0.15, always_correct_dead=False, reconcile=True)
    np.testing.assert_allclose(out, reconcile_targets(pred))  # consistent, so the correction changes nothing
    np.testing.assert_allclose(apply_postprocess(pred, correction_threshold=None, always_correct_dead=True,
                                                 derive_dead=True, reconcile=True), out)
