"""The ridge probe: a linear model on the very same frozen features and folds as a run, the baseline the 5-head
model must beat.

It answers "what do the five heads (FiLM, attention pooling, non-linear heads) add over a linear model on the
same backbone features?". Features per photo, pooled from the cached (2, T, D) tile features of both views:
the mean over the tiles (D numbers) or the mean and the max (2 x D), standardised on the training images.
Targets: log1p(grams) or sqrt(grams), one ridge for the five. For each fold, the pooling, the target space and
the regularisation alpha are chosen on an inner split of that fold's training images (the same split
`--select-on inner` uses; see `data.folds.inner_split`), or, when the run chose its ridge base with
`--ridge-select cv`, by the same inner cross-validation (the mean score over the inner parts): the probe is chosen
by the same rule as the model it is compared with. The ridge is refitted on all of them with that choice, and it
predicts the fold it never saw. Nothing is chosen on a scored fold. (log1p alone, the first version of
this probe, is 0.04-0.09 weighted R² weaker on the realistic synthetic sets: the metric is in grams.)
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from biomass5head.constants import TARGETS
from biomass5head.data.feature_cache import ensure_features
from biomass5head.data.folds import inner_parts, scored_parts
from biomass5head.infer.fold_model import fold_feature_cache, load_fold_model
from biomass5head.infer.run_folder import RunError, resolve_options, runtime
from biomass5head.metrics import compute_metrics
from biomass5head.model.ridge_base import ALPHAS, ridge_solutions

POOLINGS = ("mean", "mean_max")
SPACES = {"log1p": (np.log1p, np.expm1), "sqrt": (np.sqrt, lambda z: np.square(np.maximum(z, 0.0)))}


def pooled_features(tile_features: np.ndarray, pooling: str = "mean_max") -> np.ndarray:
    """(N, 2, T, D) tile features -> (N, D) mean over the 2T tiles of both views, or (N, 2D) mean and max."""
    flat = tile_features.reshape(len(tile_features), -1, tile_features.shape[-1])
    if pooling == "mean":
        return flat.mean(1)
    return np.concatenate([flat.mean(1), flat.max(1)], axis=1)


def ridge_path(x_fit: np.ndarray, t_fit: np.ndarray, x_eval: np.ndarray, alphas) -> np.ndarray:
    """Ridge predictions (len(alphas), N_eval, 5) for every alpha (`model.ridge_base.ridge_solutions`)."""
    mean, std, fits = ridge_solutions(x_fit, t_fit, alphas)
    xe = (x_eval - mean) / std
    return np.stack([xe @ w + b for w, b in fits])


def _grams(pred: np.ndarray, space: str) -> np.ndarray:
    return np.clip(SPACES[space][1](pred), 0.0, None)


def _scores(features, targets, held, space: str = "log1p") -> np.ndarray:
    """Weighted R2 on the `held` rows of the ridge fitted on the others, for every alpha of ALPHAS."""
    path = ridge_path(features[~held], SPACES[space][0](targets[~held]), features[held], ALPHAS)
    return np.array([compute_metrics(targets[held], _grams(p, space))["weighted_r2"] for p in path])


def choose_alpha(features: np.ndarray, targets: np.ndarray, held: np.ndarray) -> float:
    """The alpha of ALPHAS whose log1p ridge, fitted on the rows not `held`, scores best (weighted R2 in grams) on
    `held`."""
    return float(ALPHAS[int(np.argmax(_scores(features, targets, held)))])


def choose(tiles: np.ndarray, targets: np.ndarray, held: np.ndarray | list[np.ndarray]) -> tuple[str, str, float]:
    """The (pooling, target space, alpha) of POOLINGS x SPACES x ALPHAS whose ridge, fitted on the rows not `held`,
    scores best (weighted R2 in grams) on `held` (the first of equal scores). `tiles` (N, 2, T, D). `held` may be
    a list of masks (the parts of an inner cross-validation): the score is then the mean over them."""
    masks = held if isinstance(held, list) else [held]
    scores = {}
    for p in POOLINGS:
        x = pooled_features(tiles, p)
        for s in SPACES:
            mean = np.mean([_scores(x, targets, m, s) for m in masks], axis=0)
            scores.update({(p, s, float(a)): v for a, v in zip(ALPHAS, mean, strict=True)})
    return max(scores, key=scores.get)


def ridge_oof(tiles: np.ndarray, targets: np.ndarray, folds: np.ndarray, inner: dict[int, np.ndarray | list]
              ) -> tuple[np.ndarray, dict[int, tuple[str, str, float]]]:
    """Out-of-fold ridge predictions in grams (N, 5) and the (pooling, target space, alpha) chosen per fold. `tiles`
    (N, 2, T, D) cached tile features, `targets` (N, 5) grams, `folds` (N,); `inner[k]`: boolean mask over the
    training rows of fold k (rows with folds != k, in order) of those held out to choose, or a list of such masks
    (inner cross-validation: the mean score over them)."""
    pred = np.zeros_like(targets, dtype=np.float64)
    chosen = {}
    for fold in np.unique(folds):
        train, held = folds != fold, folds == fold
        pooling, space, alpha = chosen[int(fold)] = choose(tiles[train], targets[train], inner[int(fold)])
        x = pooled_features(tiles, pooling)
        pred[held] = _grams(ridge_path(x[train], SPACES[space][0](targets[train]), x[held], [alpha])[0], space)
    return pred, chosen


def probe_features(run, df: pd.DataFrame) -> np.ndarray:
    """(N, 2, T, D) frozen tile features of the run's training photos, from (or into) its feature cache."""
    opts = resolve_options(run, {"no_feature_cache": False})
    if opts.feature_cache is None:
        raise RunError("the ridge comparison needs a run trained with --freeze-backbone and the feature cache on")
    rt = runtime(opts)
    fm = load_fold_model(next(iter(run.checkpoints.values())), opts, rt.device)
    table = ensure_features(fold_feature_cache(fm, opts, rt), fm.model, df["abs_path"], ["id"], tiles=fm.tiles(opts),
                            runtime=rt, batch_size=opts.cfg.data.batch_size, desc="probe")
    return np.stack([table[str(p)]["id"] for p in df["abs_path"]])


def probe_oof(run, df: pd.DataFrame, folds: np.ndarray) -> tuple[np.ndarray, dict, int]:
    """The ridge probe's out-of-fold predictions (N, 5) over every fold of `folds`, its (pooling, space, alpha) per fold
    and the feature width D. `df` in load_train order (the order the trainer split), `folds` one per row."""
    cfg = run.config
    tiles = probe_features(run, df)
    inner = {}
    for k in map(int, np.unique(folds)):
        parts = inner_parts(df[folds != k], cfg.data.cv_strategy, cfg.train.inner_frac, cfg.fold_seed(k))
        # the same selection rule as the run's ridge base: part 0 (the inner split), or every part (--ridge-select cv)
        inner[k] = [parts == j for j in scored_parts(parts)] if cfg.train.ridge_select == "cv" else parts == 0
    pred, chosen = ridge_oof(tiles, df[list(TARGETS)].to_numpy(np.float64), folds, inner)
    return pred, chosen, tiles.shape[-1]


def probe_metrics(run, df: pd.DataFrame, folds: np.ndarray, sample_ids) -> dict:
    """The ridge probe's OOF metrics on the images `sample_ids` (in that order), trained over every fold of `folds`
    (one per row of `df`, in load_train order), with its choices per fold (`chosen_per_fold`) and the feature
    width (`feature_dim`)."""
    pred, chosen, dim = probe_oof(run, df, folds)
    rows = pd.Index(df["sample_id_prefix"]).get_indexer(pd.Index(sample_ids))
    metrics = compute_metrics(df[list(TARGETS)].to_numpy(np.float64)[rows], pred[rows])
    metrics["chosen_per_fold"] = {str(k): {"pooling": p, "space": sp, "alpha": a} for k, (p, sp, a) in chosen.items()}
    metrics["chosen_on"] = "inner cross-validation" if run.config.train.ridge_select == "cv" else "inner split"
    metrics["feature_dim"] = dim
    return metrics


def comparison(five_head: float, ridge: float, recipe: str = "reference") -> str:
    """One sentence: does the 5-head beat the ridge probe on the same features? (`recipe`: the run's `--recipe`;
    the robust recipe is suggested only to a run that did not use it.)"""
    if five_head >= ridge:
        return f"The 5-head model beats the ridge probe by {five_head - ridge:.4f} weighted R²."
    advice = ("; try `--recipe robust` (README, \"Recipes\")" if recipe != "robust" else
              ", even with `--recipe robust` (docs/MODEL_QUALITY.md has what was measured)")
    return (f"**The 5-head model loses to the ridge probe by {ridge - five_head:.4f} weighted R²**: on these photos a "
            f"linear model on the same features is better{advice}.")
