"""Post-processing of predictions in grams: the context adjustment, reconciliation, Dead correction and derive-dead.

All functions take (N, 5) arrays in TARGETS order (grams), return a new float64 array and never modify
their inputs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from biomass5head.constants import (
    AUX_HEADS,
    CLOVER,
    COMPETITION_WEIGHTS,
    DEAD,
    GDM,
    GREEN,
    IGNORE_INDEX,
    TARGETS,
    TOTAL,
)

Ratios = dict[str, dict[str, list[float]]]  # {target: {head: [ratio per class]}}
Probs = dict[str, np.ndarray]  # {head: (N, n_classes) softmax probabilities}

# Targets the context adjustment rescales, with their column in TARGETS order.
CONTEXT_TARGETS: dict[str, int] = {TARGETS[DEAD]: DEAD, TARGETS[CLOVER]: CLOVER}

# --reconcile: the five targets as sums of the three components (Green, Dead, Clover) -> (Green, Dead, Clover, GDM,
# Total), and the weighted least-squares map back: the components whose sums are nearest to five predictions under the
# competition's weights, (A^T W A)^-1 A^T W.
COMPONENTS_TO_TARGETS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float64)
_W = np.diag(COMPETITION_WEIGHTS)
TARGETS_TO_COMPONENTS = np.linalg.solve(COMPONENTS_TO_TARGETS.T @ _W @ COMPONENTS_TO_TARGETS,
                                        COMPONENTS_TO_TARGETS.T @ _W)  # (3, 5)


def _as_pred(pred) -> np.ndarray:
    """A float64 copy of ``pred`` checked to be (N, 5)."""
    out = np.array(pred, dtype=np.float64, copy=True)
    if out.ndim != 2 or out.shape[1] != len(TARGETS):
        raise ValueError(f"predictions must be (N, {len(TARGETS)}), got shape {out.shape}")
    return out


def _dead_from_total(pred: np.ndarray) -> np.ndarray:
    """max(0, Total - GDM) per row: the Dead the other heads imply (Total = GDM + Dead)."""
    return np.maximum(pred[:, TOTAL] - pred[:, GDM], 0.0)


def correct_dead(pred, threshold: float | None = 0.15, always: bool = False) -> np.ndarray:
    """Replace Dead by max(0, Total - GDM) in rows whose relative mismatch
    ``|Total - (Green + Dead + Clover)| / Total`` exceeds ``threshold`` (every row when ``always``; no row when
    ``threshold`` is None and not ``always``). A row with Total <= 0 counts as consistent when the components
    also sum to it exactly (e.g. all zero) and as inconsistent otherwise (an infinite relative mismatch).
    Rows with NaN are left as they are. Returns the corrected copy."""
    out = _as_pred(pred)
    if always:
        mask = np.ones(len(out), dtype=bool)
    elif threshold is None:
        return out
    else:
        total = out[:, TOTAL]
        diff = np.abs(total - (out[:, GREEN] + out[:, DEAD] + out[:, CLOVER]))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(total > 0, diff / np.where(total > 0, total, 1.0), np.where(diff > 0, np.inf, 0.0))
        mask = rel > threshold
    out[mask, DEAD] = _dead_from_total(out)[mask]
    return out


def reconcile_targets(pred) -> np.ndarray:
    """Make each row consistent (GDM = Green + Clover, Total = Green + Dead + Clover) with the least change the metric
    sees: Green, Dead and Clover are fitted by least squares, under the competition's weights (0.1, 0.1, 0.1, 0.2,
    0.5), to all five predictions; a negative component becomes 0; GDM and Total are then their sums. The five heads
    predict each target on its own, so each carries its own error; the fit pools the three estimates of every
    component. A consistent row is left as it is. Rows with NaN stay NaN. Returns the new array."""
    out = _as_pred(pred)
    parts = np.maximum(out @ TARGETS_TO_COMPONENTS.T, 0.0)
    return parts @ COMPONENTS_TO_TARGETS.T


def derive_dead(pred) -> np.ndarray:
    """Dead = max(0, Total - GDM) in every row; returns the new array."""
    out = _as_pred(pred)
    out[:, DEAD] = _dead_from_total(out)
    return out


def compute_context_ratios(train_df: pd.DataFrame) -> Ratios:
    """Per-context ratios of the training fold for Dead and Clover: for each aux head and class,
    ``mean(target | class) / mean(target)``, the mean taken over the rows labelled for that head (rows with
    IGNORE_INDEX are skipped for that head, so the frequency-weighted mean of a head's ratios is exactly 1).
    A class without training rows, or a head whose labelled mean is 0, gets 1.0 (no adjustment).
    Returns plain lists, ``{target: {head: [ratio per class]}}``, ready for a checkpoint."""
    ratios: Ratios = {}
    for target in CONTEXT_TARGETS:
        values = train_df[target].to_numpy(dtype=np.float64)
        ratios[target] = {}
        for head, aux in AUX_HEADS.items():
            n_classes = len(aux.classes)
            labels = train_df[aux.column].to_numpy(dtype=np.int64)
            keep = (labels != IGNORE_INDEX) & np.isfinite(values)
            head_ratios = [1.0] * n_classes
            global_mean = float(values[keep].mean()) if keep.any() else 0.0
            if global_mean > 0:
                for k in range(n_classes):
                    in_class = keep & (labels == k)
                    if in_class.any():
                        head_ratios[k] = float(values[in_class].mean()) / global_mean
            ratios[target][head] = head_ratios
    return ratios


def context_factors(probs: Probs, ratios: Ratios) -> dict[str, np.ndarray]:
    """Multiplicative factor (N,) per context target: the geometric mean over the three heads of the
    expected ratio ``probs[head] @ ratios[target][head]``.

    Why the geometric mean: State, month and species group are strongly confounded (each state was sampled in
    a few months, with its own pastures), so each head's ratio already carries most of the same effect;
    multiplying the three ratios would apply it up to three times. The geometric mean (the average of the
    log-ratios) keeps the adjustment on the scale of one ratio and agrees with it when the heads agree."""
    factors = {}
    for target in CONTEXT_TARGETS:
        log_sum = None
        for head, aux in AUX_HEADS.items():
            n_classes = len(aux.classes)
            p = np.asarray(probs[head], dtype=np.float64)
            r = np.asarray(ratios[target][head], dtype=np.float64)
            if p.ndim != 2 or p.shape[1] != n_classes or r.shape != (n_classes,):
                raise ValueError(f"{head}: probs must be (N, {n_classes}) and ratios ({n_classes},), "
                                 f"got {p.shape} and {r.shape}")
            with np.errstate(divide="ignore"):
                log_expected = np.log(p @ r)  # a 0 expected ratio gives log 0 = -inf, i.e. a factor of 0
            log_sum = log_expected if log_sum is None else log_sum + log_expected
        factors[target] = np.exp(log_sum / len(AUX_HEADS))
    return factors


def apply_context_adjustment(pred, probs: Probs, ratios: Ratios) -> np.ndarray:
    """Rescale Dead and Clover by their context factors (see ``context_factors``); ``probs`` holds the softmax
    probabilities per head, ``{"state": (N, 4), "month": (N, 10), "species": (N, 8)}``.

    Only Dead and Clover change: GDM and Total stay as the model predicted them (they are the better-predicted,
    higher-weighted targets), so GDM = Green + Clover may no longer hold exactly; a later Dead correction uses
    Total - GDM, which the adjustment does not touch. Returns the new array."""
    out = _as_pred(pred)
    factors = context_factors(probs, ratios)
    for target, column in CONTEXT_TARGETS.items():
        if factors[target].shape != (len(out),):
            raise ValueError(f"probs have {factors[target].shape[0]} rows, predictions {len(out)}")
        out[:, column] *= factors[target]
    return out


def apply_postprocess(
    pred,
    *,
    correction_threshold: float | None,
    always_correct_dead: bool,
    derive_dead: bool = False,
    context: tuple[Probs, Ratios] | None = None,
    reconcile: bool = False,
) -> np.ndarray:
    """The run's post-processing in order: context adjustment (``context = (probs, ratios)``), reconciliation,
    Dead correction (``correction_threshold`` / ``always_correct_dead``), then derive-dead. Returns the new array.
    (After reconciliation the rows are consistent, so the Dead correction and derive-dead change nothing.)"""
    out = _as_pred(pred)
    if context is not None:
        probs, ratios = context
        out = apply_context_adjustment(out, probs, ratios)
    if reconcile:
        out = reconcile_targets(out)
    out = correct_dead(out, correction_threshold, always=always_correct_dead)
    if derive_dead:
        out[:, DEAD] = _dead_from_total(out)
    return out
