"""`--ridge-base` in a fold: fit the model's closed-form ridge on the rows the heads train on, before the first epoch.

The rows are each training image's original features and, when the heads train on a feature bank (`--aug-prob > 0`
with a frozen backbone), its K pre-augmented variants too, with the image's targets. On small noisy sets the
augmented rows are what regularises the ridge: they show it which directions of the features are lighting, colour,
blur and framing rather than biomass (docs/MODEL_QUALITY.md, "Third round"). The alpha is chosen on the selection
images' original features, scored in grams with the primary metric.
"""
from __future__ import annotations

import logging

import numpy as np

from biomass5head.constants import TARGETS
from biomass5head.data.feature_cache import FeatureCache, ensure_features
from biomass5head.metrics import compute_metrics
from biomass5head.model.ridge_base import fit_ridge_base

logger = logging.getLogger(__name__)


def ridge_rows(df, originals: dict, bank: dict) -> tuple[np.ndarray, np.ndarray]:
    """(features (R, 2, T, D), grams (R, 5)) of the images of `df`: the originals first, then each bank variant of
    every image (variant-major). `originals`: {path: {"id": features}}; `bank`: {path: {variant: features}}, empty
    for no bank."""
    paths = [str(p) for p in df["abs_path"]]
    grams = df[list(TARGETS)].to_numpy(np.float64)
    variants = sorted(bank[paths[0]]) if bank else []
    feats = [np.stack([originals[p]["id"] for p in paths])]
    feats += [np.stack([bank[p][v] for p in paths]) for v in variants]
    return np.concatenate(feats), np.tile(grams, (1 + len(variants), 1))


def fit_fold_ridge(trainer) -> float:
    """Fit `trainer.model.ridge` (a FoldTrainer's); alpha chosen on `val_df` for a ridge on `ridge_df`, then (the
    refit, where `ridge_df` is fewer images) that alpha on every training image. Returns the alpha."""
    root, key, common = trainer._feature_cache()
    train_df, ridge_df, val_df = trainer.train_df, trainer.ridge_df, trainer.val_df
    paths = [str(p) for p in (*train_df["abs_path"], *val_df["abs_path"])]
    originals = ensure_features(FeatureCache(root, **key), trainer.model, paths, ["id"],
                                desc=f"fold {trainer.fold} features", **common)
    bank = trainer.bank_features(list(train_df["abs_path"])) if trainer.feature_plan.aug_key else {}
    fit, fit_g = ridge_rows(ridge_df, originals, bank)
    select, grams = ridge_rows(val_df, originals, {})
    enc, dec = trainer.transform.encode, trainer.transform.decode
    alpha = fit_ridge_base(trainer.model.ridge, fit, enc(fit_g), select, grams, dec,
                           lambda true, pred: compute_metrics(true, pred)["weighted_r2"])
    if ridge_df is not train_df:  # the refit: that alpha, on every training image
        fit, fit_g = ridge_rows(train_df, originals, bank)
        fit_ridge_base(trainer.model.ridge, fit, enc(fit_g), select, grams, dec, None, alphas=[alpha])
    logger.info("fold %d: ridge base fitted on %d images (%d rows with the feature bank's; %s space), alpha %g chosen "
                "on the %d selection images", trainer.fold, len(train_df), len(fit), trainer.transform.kind, alpha,
                len(select))
    return alpha
