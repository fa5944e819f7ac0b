"""`--ridge-base` in a fold: fit the model's closed-form ridge before the first epoch.

Candidates: a ridge on each training image's original features, and, when the heads train on a feature bank
(`--aug-prob > 0` with a frozen backbone), a ridge on the originals and their K pre-augmented variants (each variant
a row with its image's targets). The augmented rows regularise the ridge where photos vary in lighting, colour, blur
and framing: they show it which directions of the features are not biomass. Where photos do not vary that way they
cost signal (docs/MODEL_QUALITY.md, "Third round"). So the rows and the alpha are chosen together on the selection
images' original features, scored in grams with the primary metric: never on a scored fold.
"""
from __future__ import annotations

import logging

import numpy as np

from biomass5head.constants import TARGETS
from biomass5head.data.feature_cache import FeatureCache, ensure_features
from biomass5head.metrics import compute_metrics
from biomass5head.model.ridge_base import choose_ridge

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


def choose_rows(candidates: dict, select: np.ndarray, grams: np.ndarray, transform) -> tuple[str, float, tuple, int]:
    """The candidate rows and alpha whose ridge scores best on the selection images (`select` features, `grams`):
    (rows, alpha, (mean, std, weight, bias), number of rows). `candidates`: {rows: (features, grams)}, in order of
    preference: a tie keeps the earlier one. `transform`: the fold's TargetTransform (the ridge's target space)."""
    best = None
    for rows, (x, g) in candidates.items():
        score, alpha, fit = choose_ridge(x, transform.encode(g), select, grams, transform.decode,
                                         lambda true, pred: compute_metrics(true, pred)["weighted_r2"])
        if best is None or score > best[0]:
            best = (score, rows, alpha, fit, len(x))
    return best[1:]


def fit_fold_ridge(trainer) -> tuple[float, str]:
    """Fit `trainer.model.ridge` (a FoldTrainer's): rows and alpha chosen on `val_df` for a ridge on `ridge_df`,
    then (the refit, where `ridge_df` is fewer images) that choice on every training image. Returns (alpha, rows):
    rows "originals" or "originals+bank"."""
    root, key, common = trainer._feature_cache()
    train_df, ridge_df, val_df = trainer.train_df, trainer.ridge_df, trainer.val_df
    paths = [str(p) for p in (*train_df["abs_path"], *val_df["abs_path"])]
    originals = ensure_features(FeatureCache(root, **key), trainer.model, paths, ["id"],
                                desc=f"fold {trainer.fold} features", **common)
    banks = {"originals": {}}
    if trainer.feature_plan.aug_key:
        banks["originals+bank"] = trainer.bank_features(list(train_df["abs_path"]))
    select, grams = ridge_rows(val_df, originals, {})
    candidates = {rows: ridge_rows(ridge_df, originals, bank) for rows, bank in banks.items()}
    rows, alpha, fit, n_rows = choose_rows(candidates, select, grams, trainer.transform)
    if ridge_df is not train_df:  # the refit: that choice, on every training image
        x, g = ridge_rows(train_df, originals, banks[rows])
        _, _, fit = choose_ridge(x, trainer.transform.encode(g), select, grams, None, None, alphas=[alpha])
        n_rows = len(x)
    trainer.model.ridge.set(*fit)
    logger.info("fold %d: ridge base fitted on %d images (%d rows: %s; %s space), alpha %g chosen on the %d selection "
                "images", trainer.fold, len(train_df), n_rows, rows, trainer.transform.kind, alpha, len(select))
    return alpha, rows
