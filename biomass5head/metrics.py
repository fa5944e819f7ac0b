"""Competition metrics in grams: the global weighted R2 (primary), per-target R2 / RMSE / MAE and the
weighted mean of per-target R2.

An R2 whose true values are all equal (zero total sum of squares) follows scikit-learn's `force_finite`
convention: 1.0 when the prediction is exact, otherwise 0.0. This keeps every score finite, so it can go
into JSON and into early stopping; it matters for per-target R2 on small folds (e.g. a fold where every
Clover value is 0).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from biomass5head.constants import COMPETITION_WEIGHTS, TARGET_SHORT, TARGETS

NUM_TARGETS = len(TARGETS)


def _check_inputs(y_true, y_pred, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 copies of the inputs after checking shapes (N, 5), N >= 2, finite values and weights."""
    arrays = []
    for name, value in (("y_true", y_true), ("y_pred", y_pred)):
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != NUM_TARGETS:
            raise ValueError(f"{name} must have shape (N, {NUM_TARGETS}) in the order {TARGETS}, got {arr.shape}")
        if not np.isfinite(arr).all():
            rows = np.unique(np.nonzero(~np.isfinite(arr))[0])
            raise ValueError(f"{name} has non-finite values in {len(rows)} row(s), e.g. rows {rows[:10].tolist()}")
        arrays.append(arr)
    true, pred = arrays
    if true.shape != pred.shape:
        raise ValueError(f"y_true {true.shape} and y_pred {pred.shape} must have the same shape")
    if true.shape[0] < 2:
        raise ValueError(f"R2 needs at least 2 images, got {true.shape[0]}")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (NUM_TARGETS,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {NUM_TARGETS} finite non-negative numbers with a positive sum, "
                         f"got {weights!r}")
    return true, pred, w


def _r2(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """(Weighted) coefficient of determination; a constant y gives 1.0 if exact, else 0.0 (force_finite)."""
    w = np.ones_like(y) if w is None else w
    mean = np.sum(w * y) / np.sum(w)
    ss_res = float(np.sum(w * (y - p) ** 2))
    ss_tot = float(np.sum(w * (y - mean) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def weighted_r2(y_true, y_pred, weights: Sequence[float] = COMPETITION_WEIGHTS) -> float:
    """The competition's global weighted R2 over all (image, target) rows.

    Every value of target k carries weight w_k: R2_w = 1 - sum w (y - p)^2 / sum w (y - ybar_w)^2 with
    ybar_w = sum w y / sum w, taken over all N x 5 values at once (sklearn's `r2_score` on the flattened
    rows with `sample_weight` gives the same number). Inputs are (N, 5) arrays in grams, TARGETS order.
    """
    true, pred, w = _check_inputs(y_true, y_pred, weights)
    row_w = np.broadcast_to(w, true.shape)
    return _r2(true.ravel(), pred.ravel(), row_w.ravel())


def compute_metrics(y_true, y_pred, weights: Sequence[float] = COMPETITION_WEIGHTS) -> dict:
    """All scores of (N, 5) predictions in grams, as plain Python numbers (JSON-serialisable).

    Returns `weighted_r2` (global, primary), `weighted_r2_mean_per_target` (sum_k w_k R2_k / sum_k w_k),
    `per_target` ({target: {r2, rmse, mae}} keyed by TARGETS names) and `n_images`.
    """
    true, pred, w = _check_inputs(y_true, y_pred, weights)
    per_target = {}
    for k, name in enumerate(TARGETS):
        err = true[:, k] - pred[:, k]
        per_target[name] = {
            "r2": _r2(true[:, k], pred[:, k]),
            "rmse": float(np.sqrt(np.mean(err**2))),
            "mae": float(np.mean(np.abs(err))),
        }
    r2s = np.array([per_target[name]["r2"] for name in TARGETS])
    return {
        "weighted_r2": weighted_r2(true, pred, w),
        "weighted_r2_mean_per_target": float(np.sum(w * r2s) / np.sum(w)),
        "per_target": per_target,
        "n_images": int(true.shape[0]),
    }


def format_metrics_table(metrics: dict) -> str:
    """A fixed-width table of `compute_metrics` output: one row per target, then the two weighted scores."""
    lines = [f"{'target':<14} {'short':<6} {'R2':>8} {'RMSE':>10} {'MAE':>10}"]
    for name, short in zip(TARGETS, TARGET_SHORT, strict=True):
        row = metrics["per_target"][name]
        lines.append(f"{name:<14} {short:<6} {row['r2']:>8.4f} {row['rmse']:>10.3f} {row['mae']:>10.3f}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{'weighted R2 (global, primary)':<32} {metrics['weighted_r2']:>8.4f}")
    lines.append(f"{'weighted mean of per-target R2':<32} {metrics['weighted_r2_mean_per_target']:>8.4f}")
    if "n_images" in metrics:
        lines.append(f"{'images':<32} {metrics['n_images']:>8d}")
    return "\n".join(lines)
