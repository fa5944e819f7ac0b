"""`--ridge-base` in a fold: fit the model's closed-form ridge before the first epoch.

Candidates: a ridge on each training image's original features, and, when the heads train on a feature bank
(`--aug-prob > 0` with a frozen backbone), a ridge on the originals and their K pre-augmented variants (each variant
a row with its image's targets). The augmented rows regularise the ridge where photos vary in lighting, colour, blur
and framing: they show it which directions of the features are not biomass. Where photos do not vary that way they
cost signal (docs/MODEL_QUALITY.md, "Third round"). So the rows and the alpha are chosen together, scored in grams
with the primary metric on original features (`--ridge-select`):
- holdout: on the selection images (the inner split with `--select-on inner`, the scored fold as the reference
  selects with `--select-on fold`);
- cv: by cross-validation over the inner parts of the fold's training folds (`data.folds.inner_parts`, grouped like
  the outer split; part 0 is the inner split), the mean of the parts' scores, as scikit-learn's GridSearchCV scores.
  Every training image then serves the choice, not one part of about 60 images, whose choice of alpha varied
  enough between folds to cost the ridge 0.01-0.05 (docs/MODEL_QUALITY.md, "Fifth round"); the scored fold never
  does. (With `--select-on inner` the inner split then serves the ridge's choice and the epoch's, so the inner score
  in summary.json is a little optimistic; the OOF score is not.)
"""
from __future__ import annotations

import logging

import numpy as np

from biomass5head.constants import TARGETS
from biomass5head.data.feature_cache import FeatureCache, ensure_features
from biomass5head.data.folds import inner_parts, scored_parts
from biomass5head.metrics import compute_metrics
from biomass5head.model.ridge_base import ALPHAS, MIN_TARGET, choose_ridge, ridge_solutions

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


def _weighted_r2(true: np.ndarray, pred: np.ndarray) -> float:
    return compute_metrics(true, pred)["weighted_r2"]


def choose_rows(candidates: dict, select: np.ndarray, grams: np.ndarray, transform) -> tuple[str, float, tuple, int]:
    """The candidate rows and alpha whose ridge scores best on the selection images (`select` features, `grams`):
    (rows, alpha, (mean, std, weight, bias), number of rows). `candidates`: {rows: (features, grams)}, in order of
    preference: a tie keeps the earlier one. `transform`: the fold's TargetTransform (the ridge's target space)."""
    best = None
    for rows, (x, g) in candidates.items():
        score, alpha, fit = choose_ridge(x, transform.encode(g), select, grams, transform.decode,
                                         _weighted_r2)
        if best is None or score > best[0]:
            best = (score, rows, alpha, fit, len(x))
    return best[1:]


def choose_rows_cv(candidates: dict, parts: np.ndarray, transform, alphas=ALPHAS) -> tuple[str, float, float]:
    """The candidate rows and alpha with the best mean score over the inner parts: (rows, alpha, mean score).

    `candidates`: {rows: (features (R, 2, T, D), grams (R, 5))} of the training folds' images as `ridge_rows` stacks
    them (the N originals first, then each bank variant of every image), in order of preference: a tie keeps the
    earlier one. `parts` (N,): each image's inner part. For part j the ridge is fitted on the rows of the other
    parts' images (with their bank rows) and scored on part j's original features, in grams; a part of fewer than
    2 images is not scored (`data.folds.scored_parts`)."""
    best = None
    for rows, (x, g) in candidates.items():
        row_part = np.tile(parts, len(x) // len(parts))
        pooled = x.mean(axis=(1, 2), dtype=np.float64)  # the mean over both views' tiles, as choose_ridge pools
        scores = []
        for part in scored_parts(parts):
            held = np.flatnonzero(parts == part)  # original rows only: the images as eval sees them
            mean, std, fits = ridge_solutions(pooled[row_part != part], transform.encode(g[row_part != part]), alphas)
            xs = (pooled[held] - mean) / std
            scores.append([_weighted_r2(g[held], transform.decode(np.maximum(xs @ w + b, MIN_TARGET)))
                           for w, b in fits])
        mean_scores = np.mean(scores, axis=0)  # over the parts, per alpha
        k = int(np.argmax(mean_scores))
        if best is None or mean_scores[k] > best[2]:
            best = (rows, float(alphas[k]), float(mean_scores[k]))
    return best


def fit_fold_ridge(trainer) -> tuple[float, str]:
    """Fit `trainer.model.ridge` (a FoldTrainer's) on `train_df` with rows and alpha chosen as `--ridge-select`
    says: holdout, on `val_df` for a ridge on `ridge_df`, then (the refit, where `ridge_df` is fewer images) that
    choice on every training image; cv, on the inner parts of `train_folds_df`. Returns (alpha, rows): rows
    "originals" or "originals+bank"."""
    cfg = trainer.cfg
    root, key, common = trainer._feature_cache()
    train_df, ridge_df, val_df = trainer.train_df, trainer.ridge_df, trainer.val_df
    cv = cfg.train.ridge_select == "cv"
    pool_df = trainer.train_folds_df if cv else ridge_df  # the images whose rows the choice fits ridges on
    paths = [str(p) for p in (*train_df["abs_path"], *val_df["abs_path"], *pool_df["abs_path"])]
    originals = ensure_features(FeatureCache(root, **key), trainer.model, paths, ["id"],
                                desc=f"fold {trainer.fold} features", **common)
    banks = {"originals": {}}
    if trainer.feature_plan.aug_key:
        bank_paths = (*train_df["abs_path"], *pool_df["abs_path"]) if cv else train_df["abs_path"]
        banks["originals+bank"] = trainer.bank_features(list(dict.fromkeys(map(str, bank_paths))))
    candidates = {rows: ridge_rows(pool_df, originals, bank) for rows, bank in banks.items()}
    if cv:
        parts = inner_parts(pool_df, cfg.data.cv_strategy, cfg.train.inner_frac, cfg.fold_seed(trainer.fold))
        rows, alpha, score = choose_rows_cv(candidates, parts, trainer.transform)
        how = (f"by {len(scored_parts(parts))}-part inner cross-validation over the {len(pool_df)} training images "
               f"(mean weighted R2 {score:.4f})")
    else:
        select, grams = ridge_rows(val_df, originals, {})
        rows, alpha, fit, n_rows = choose_rows(candidates, select, grams, trainer.transform)
        how = f"on the {len(select)} selection images"
    if cv or ridge_df is not train_df:  # that choice, on every image the ridge fits (the refit: all of them)
        x, g = ridge_rows(train_df, originals, banks[rows])
        _, _, fit = choose_ridge(x, trainer.transform.encode(g), None, None, None, None, alphas=[alpha])
        n_rows = len(x)
    trainer.model.ridge.set(*fit)
    logger.info("fold %d: ridge base fitted on %d images (%d rows: %s; %s space), alpha %g chosen %s", trainer.fold,
                len(train_df), n_rows, rows, trainer.transform.kind, alpha, how)
    return alpha, rows
