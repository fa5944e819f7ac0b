"""A linear probe on the same frozen features: ridge regression of log1p(grams) on each photo's tile features.

It answers "what do the five heads (FiLM, attention pooling, non-linear heads) add over a linear model on the
very same backbone features?". Features per photo: the (2, T, D) cached tile features, flattened. Each fold's
ridge (alpha chosen by internal cross-validation on its training images) predicts the images it holds out.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ALPHAS = np.logspace(-1, 5, 13)


def ridge_oof(features: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold ridge predictions in grams (N, 5): fit on log1p(targets) of the other folds, expm1 back,
    clipped at 0. `features` (N, F), `targets` (N, 5) grams, `folds` (N,)."""
    pred = np.zeros_like(targets, dtype=np.float64)
    for fold in np.unique(folds):
        train, held = folds != fold, folds == fold
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
        model.fit(features[train], np.log1p(targets[train]))
        pred[held] = np.clip(np.expm1(model.predict(features[held])), 0.0, None)
    return pred
