"""A finished run's fold models: each rebuilt from its checkpoint (no pretrained weights, so this works offline) and
run over photos to grams, from pixels or from the frozen-feature cache; out of fold (`predict_oof`) or as the
average of all folds (`predict_ensemble`).

Context adjustment uses each fold's own ratios, so it is applied here, per fold model; Dead correction and
derive-dead act on the final prediction (`finish`: the fold's for OOF, the fold average for prediction).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.layers import resample_abs_pos_embed

from biomass5head.config import RunConfig
from biomass5head.data.datasets import BiomassDataset, FeatureDataset, make_loader
from biomass5head.data.feature_cache import FeatureCache, ensure_features, state_dict_digest
from biomass5head.data.images import TileSpec
from biomass5head.device import Runtime
from biomass5head.infer.run_folder import InferenceOptions, Run, RunError, check_against
from biomass5head.model.checkpoint import CHECKPOINT_RE, load_checkpoint
from biomass5head.model.five_head import build_model
from biomass5head.model.intervals import IntervalBins
from biomass5head.model.postprocess import apply_postprocess
from biomass5head.model.predict import predict
from biomass5head.model.targets import TargetTransform

logger = logging.getLogger(__name__)


@dataclass
class FoldModel:
    """One fold's model (eval mode, on its device) with the transform and context ratios of its checkpoint."""
    fold: int
    model: torch.nn.Module
    transform: TargetTransform
    context_ratios: dict | None

    def tiles(self, opts: InferenceOptions) -> TileSpec:
        """The tile spec this model reads at the options' grid and --img-size."""
        m = opts.cfg.model
        return TileSpec(m.grid, m.img_size, *self.model.mean_std)


def fit_pos_embed(state: dict, model: torch.nn.Module) -> dict:
    """The state dict with the backbone's position embeddings resampled (timm's resample_abs_pos_embed) to the
    model's patch grid when the checkpoint was trained at another --img-size."""
    key, backbone = "backbone.pos_embed", getattr(model, "backbone", None)
    target = getattr(backbone, "pos_embed", None)
    if key not in state or target is None or state[key].shape == target.shape:
        return state
    n_prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 0))
    old_side = int(round(math.sqrt(state[key].shape[1] - n_prefix)))
    resampled = resample_abs_pos_embed(state[key], new_size=list(backbone.patch_embed.grid_size),
                                       old_size=[old_side, old_side], num_prefix_tokens=n_prefix)
    return {**state, key: resampled}


def load_fold_model(path: Path, opts: InferenceOptions, device: torch.device) -> FoldModel:
    """Rebuild a checkpoint's model (no pretrained weights, at the options' --img-size) and load its weights."""
    ckpt = load_checkpoint(path)
    cfg = RunConfig.from_dict(ckpt["config"])
    check_against(asdict(cfg.model), asdict(opts.cfg.model), f"checkpoint {path}",
                  hint="; config.json or the command line disagree with this checkpoint")
    expected = CHECKPOINT_RE.match(path.name)
    if expected and int(expected.group(1)) != int(ckpt["fold"]):
        raise RunError(f"checkpoint {path} holds fold {ckpt['fold']}, not the fold its name says")
    if opts.cfg.post.apply_context_adjustment and not ckpt.get("context_ratios"):
        raise RunError(f"checkpoint {path} has no context ratios, but the run applies the context adjustment")
    cfg = replace(cfg, model=replace(cfg.model, img_size=opts.cfg.model.img_size, grad_ckpt=False))
    model = build_model(cfg, pretrained=False, interval_bins=_interval_bins(ckpt, cfg, path))
    try:
        model.load_state_dict(fit_pos_embed(ckpt["model"], model))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise RunError(f"the weights in {path} do not fit the model its configuration describes: {detail}") from exc
    model.to(device).eval()
    return FoldModel(int(ckpt["fold"]), model, TargetTransform.from_dict(ckpt["target_transform"]),
                     ckpt.get("context_ratios"))


def _interval_bins(ckpt: dict, cfg: RunConfig, path: Path) -> IntervalBins | None:
    """The fold's interval bins a checkpoint of an --interval-heads run holds (they size the heads)."""
    if not cfg.model.interval_heads:
        return None
    if not ckpt.get("interval_bins"):
        raise RunError(f"checkpoint {path} was trained with --interval-heads but holds no interval bins")
    try:
        bins = IntervalBins.from_dict(ckpt["interval_bins"])
    except ValueError as exc:
        raise RunError(f"checkpoint {path}: {exc}") from exc
    if bins.k != cfg.model.interval_heads:
        raise RunError(f"checkpoint {path}: interval bins fitted for K={bins.k}, its configuration says "
                       f"--interval-heads {cfg.model.interval_heads}")
    return bins


def backbone_digests(folds: list[FoldModel]) -> list[str]:
    """Each fold model's backbone weights digest, in fold order: all equal when the folds share one frozen backbone
    (a head-only run), which then needs to encode a photo only once."""
    return [state_dict_digest(fm.model.backbone) for fm in folds]


def fold_feature_cache(fm: FoldModel, opts: InferenceOptions, rt: Runtime) -> FeatureCache:
    """The frozen-feature cache that holds this fold model's features (keyed by its backbone weights)."""
    return FeatureCache(opts.feature_cache, backbone=opts.cfg.model.backbone, tiles=fm.tiles(opts),
                        tile_feature=opts.cfg.model.tile_feature,
                        weights_digest=state_dict_digest(fm.model.backbone), compute_dtype=rt.dtype_name)


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
    """The run's --reconcile and Dead correction, then --derive-dead (Dead = max(0, Total - GDM)) when chosen."""
    p = opts.cfg.post
    return apply_postprocess(pred, correction_threshold=p.correction_threshold,
                             always_correct_dead=p.always_correct_dead, derive_dead=opts.derive_dead,
                             reconcile=p.reconcile)


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
