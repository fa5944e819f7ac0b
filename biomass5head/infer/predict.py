"""Predicting grams with a finished run's fold models: one fold model (out of fold), or the average of all of them.

Context adjustment uses each fold's own ratios, so it is applied per fold model; Dead correction and derive-dead
act on the final prediction (the fold's for OOF, the fold average for prediction). A run whose backbone stayed
frozen predicts from the frozen-feature cache (`opts.feature_cache`), others from pixels.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from biomass5head.data.datasets import BiomassDataset, FeatureDataset, make_loader
from biomass5head.data.feature_cache import FeatureCache, ensure_features
from biomass5head.device import Runtime
from biomass5head.infer.run import FoldModel, InferenceOptions, Run, fold_feature_cache, load_fold_model
from biomass5head.model.postprocess import apply_postprocess
from biomass5head.model.predict import predict

logger = logging.getLogger(__name__)


def predict_from_cache(fm: FoldModel, df: pd.DataFrame, cache: FeatureCache, opts: InferenceOptions, rt: Runtime,
                       *, variants: list[str], desc: str = "predict") -> dict:
    """`model.predict.predict`'s result for the rows of `df` computed from cached features, averaging the
    predictions (grams) and aux probabilities over `variants` (["id"], or ["id", "h", "v"] for TTA)."""
    batch_size = opts.cfg.data.batch_size
    table = ensure_features(cache, fm.model, df["abs_path"], variants, tiles=fm.tiles(opts), runtime=rt,
                            batch_size=batch_size, desc=f"{desc} features")
    outs = []
    for variant in variants:
        loader = make_loader(FeatureDataset(df, table, [variant]), batch_size=batch_size, shuffle=False,
                             num_workers=0, prefetch_factor=1, seed=0)
        outs.append(predict(fm.model, loader, rt, fm.transform, grid=opts.cfg.model.grid, desc=f"{desc} {variant}"))
    first = outs[0]
    return {"pred": np.mean([o["pred"] for o in outs], axis=0), "index": first["index"], "true": first["true"],
            "probs": {h: np.mean([o["probs"][h] for o in outs], axis=0) for h in first["probs"]}}


def predict_grams(fm: FoldModel, df: pd.DataFrame, opts: InferenceOptions, rt: Runtime,
                  desc: str = "predict") -> np.ndarray:
    """(N, 5) grams of one fold model for the rows of `df` (needs only `abs_path`), with TTA as chosen and the
    run's context adjustment (with this fold's ratios); Dead correction and derive-dead are left to `finish`."""
    df = df.reset_index(drop=True)
    if opts.feature_cache:
        out = predict_from_cache(fm, df, fold_feature_cache(fm, opts, rt), opts, rt,
                                 variants=["id", "h", "v"] if opts.tta else ["id"], desc=desc)
    else:
        d = opts.cfg.data
        loader = make_loader(BiomassDataset(df, fm.tiles(opts)), batch_size=d.batch_size, shuffle=False,
                             num_workers=rt.num_workers, prefetch_factor=d.prefetch_factor, seed=0,
                             pin_memory=rt.device.type == "cuda")
        out = predict(fm.model, loader, rt, fm.transform, grid=opts.cfg.model.grid, tta=opts.tta, desc=desc)
    if not opts.cfg.post.apply_context_adjustment:
        return out["pred"]
    return apply_postprocess(out["pred"], correction_threshold=None, always_correct_dead=False,
                             context=(out["probs"], fm.context_ratios))


def finish(pred: np.ndarray, opts: InferenceOptions) -> np.ndarray:
    """The run's Dead correction, then --derive-dead (Dead = max(0, Total - GDM)) when chosen."""
    p = opts.cfg.post
    return apply_postprocess(pred, correction_threshold=p.correction_threshold,
                             always_correct_dead=p.always_correct_dead, derive_dead=opts.derive_dead)


def predict_oof(run: Run, df: pd.DataFrame, folds: np.ndarray, opts: InferenceOptions, rt: Runtime
                ) -> tuple[np.ndarray, list[int], list[int]]:
    """Out-of-fold grams: each row of `df` by the model of its fold (`folds`, aligned with df), post-processed.
    Returns (pred (N, 5), NaN in rows of folds without a checkpoint; folds evaluated; folds skipped)."""
    pred = np.full((len(df), 5), np.nan)
    evaluated, skipped = [], []
    for fold in sorted(set(folds.tolist())):
        rows = np.flatnonzero(folds == fold)
        if fold not in run.checkpoints:
            logger.warning("fold %d: no checkpoint in %s, its %d image(s) are skipped", fold, run.path, len(rows))
            skipped.append(fold)
            continue
        fm = load_fold_model(run.checkpoints[fold], opts, rt.device)
        grams = predict_grams(fm, df.iloc[rows], opts, rt, desc=f"fold {fold} OOF")
        pred[rows] = finish(grams, opts)
        evaluated.append(fold)
        del fm
    return pred, evaluated, skipped


def predict_ensemble(run: Run, df: pd.DataFrame, opts: InferenceOptions, rt: Runtime) -> np.ndarray:
    """(N, 5) grams: the average of every fold model's prediction (each decoded by its own transform and context
    ratios), then the run's Dead correction and --derive-dead."""
    total = np.zeros((len(df), 5))
    for fold, path in run.checkpoints.items():
        fm = load_fold_model(path, opts, rt.device)
        total += predict_grams(fm, df, opts, rt, desc=f"fold {fold}")
        del fm
    return finish(total / len(run.checkpoints), opts)
