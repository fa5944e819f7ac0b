"""A whole training run: the run folder, folds, every fold of --train-folds, then summary.json and the plots.

`run(cfg)` is what `python -m src.train_5head` (`biomass5head train`) does once its options are parsed into a
`RunConfig`; one fold's training is `train.trainer.FoldTrainer`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from biomass5head.config import ConfigError, RunConfig
from biomass5head.constants import COMPETITION_WEIGHTS, TARGETS
from biomass5head.data.datasets import build_image_cache
from biomass5head.data.folds import FoldError, fold_summary, inner_split, make_folds, read_fold_csv, write_folds
from biomass5head.data.images import TileSpec
from biomass5head.data.photo_check import check_photos
from biomass5head.data.tables import load_train
from biomass5head.device import resolve_runtime
from biomass5head.fileio import write_json
from biomass5head.interrupt import Stopped
from biomass5head.model.checkpoint import checkpoint_name, find_checkpoints
from biomass5head.model.five_head import build_model, describe
from biomass5head.plots import plot_learning_curves
from biomass5head.train.resume import last_state_name
from biomass5head.train.trainer import FoldTrainer

logger = logging.getLogger(__name__)

RUN_FILES = ("config.json", "folds.csv", "summary.json")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(output_dir: str | None) -> Path:
    """The run folder: the given one (refused when it already holds a run) or a new timestamped one."""
    if output_dir is None:
        base = Path("outputs") / datetime.now().strftime("5head_%Y%m%d_%H%M%S")
        path, n = base, 1
        while path.exists():
            path, n = Path(f"{base}_{n}"), n + 1
        return path
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path} exists and is not a folder")
    if path.is_dir():
        held = [f for f in RUN_FILES if (path / f).exists()] + [p.name for p in find_checkpoints(path).values()]
        if held:
            raise ConfigError(f"--output-dir {path} already holds a run ({', '.join(held[:4])}): "
                              "choose a new folder so earlier results are not overwritten")
    return path


def assign_folds(cfg: RunConfig, df: pd.DataFrame) -> np.ndarray:
    """Folds from --fold-csv when given (it overrides --cv-strategy), otherwise from the CV strategy."""
    d = cfg.data
    if d.fold_csv:
        logger.info("folds from %s (overrides --cv-strategy)", d.fold_csv)
        return read_fold_csv(d.fold_csv, df, d.num_folds)
    return make_folds(df, d.cv_strategy, d.num_folds, cfg.seed)


def check_backbone(cfg: RunConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Build the model once before anything is written, so missing weights or a bad name fail fast; returns the
    backbone's normalisation (mean, std)."""
    model = build_model(cfg)
    logger.info("model: %s (%s weights); %s", cfg.model.backbone, cfg.model.backbone_weights or
                ("pretrained" if cfg.model.pretrained else "random"), describe(model))
    return model.mean_std


def run(cfg: RunConfig, resume: bool = False, command: str = "python -m src.train_5head") -> dict:
    """Train every fold of --train-folds; returns the summary also written to summary.json. With `resume`, the run
    folder `cfg.output_dir` exists: its folds.csv is kept, finished folds (in summary.json) are skipped and an
    unfinished fold continues from its resume state. `command` is how the user runs training (for the hint a stop
    prints)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise ConfigError(f"torchrun with {world_size} processes: multi-GPU training is not supported yet; "
                          "run a single process")
    rt = resolve_runtime(cfg.device_type, cfg.train.amp_dtype, cfg.data.num_workers)
    out_dir = Path(cfg.output_dir) if resume else prepare_output_dir(cfg.output_dir)
    df = load_train(cfg.data.base_path)
    check_photos(df["abs_path"], cfg.model.grid, cfg.model.img_size, level=cfg.data.check_photos,
                 allow_any_aspect=cfg.data.allow_any_aspect, what="training photos")
    folds = read_fold_csv(out_dir / "folds.csv", df, cfg.data.num_folds) if resume else assign_folds(cfg, df)
    missing = [k for k in cfg.data.train_folds if not (folds == k).any()]
    if missing:
        raise FoldError(f"--train-folds {missing}: no images in those folds")
    logger.info("%d images, %d folds, mode %s, device %s, precision %s, %d DataLoader workers", len(df),
                cfg.data.num_folds, cfg.train.mode, rt.device, rt.dtype_name, rt.num_workers)
    logger.info("folds:\n%s", fold_summary(df, folds))
    seed_everything(cfg.seed)
    mean_std = check_backbone(cfg)

    done = {}
    if resume:
        record = json.loads((out_dir / "config.json").read_text())
        if (out_dir / "summary.json").is_file():
            done = {int(k): r for k, r in json.loads((out_dir / "summary.json").read_text())["folds"].items()}
        logger.info("resuming %s: folds %s finished", out_dir, sorted(done) or "none")
        for leftover in out_dir.glob(".*.tmp"):  # what a second Ctrl-C (an immediate exit) may have left
            leftover.unlink(missing_ok=True)
    else:
        record = {**cfg.to_dict(), "runtime": rt.record()}  # config.json, also inside every checkpoint
        start_run_folder(out_dir, record, df, folds)
        logger.info("run folder: %s", out_dir)
    tiles = TileSpec(cfg.model.grid, cfg.model.img_size, *mean_std)
    cache = build_image_cache(df["abs_path"], tiles) if cfg.data.cache_images else None

    results = [done[k] for k in cfg.data.train_folds if k in done]
    hint = f"resume with: {command} --resume {out_dir}"
    try:
        for fold in (k for k in cfg.data.train_folds if k not in done):
            results.append(train_fold(cfg, fold, df, folds, rt, out_dir, cache, record, hint))
            write_json(out_dir / "summary.json", summarize(results, cfg))  # finished folds, so far
            if not cfg.train.keep_last:  # only now: until summary.json records the fold, its state may be needed
                (out_dir / last_state_name(fold)).unlink(missing_ok=True)
    except Stopped as stop:
        if hint in str(stop):
            raise
        raise Stopped(stop.signum, f"{stop}; {hint}") from None
    summary = summarize(results, cfg)
    logs = {k: pd.read_csv(out_dir / f"log_fold{k}.csv") for k in cfg.data.train_folds}
    plot_learning_curves(logs, out_dir / "learning_curves.png")
    where = ("on the scored folds themselves: optimistic; train with --select-on inner for an honest OOF score"
             if cfg.train.select_on == "fold" else "on the inner selection splits (not an OOF score)")
    logger.info("mean best weighted R2 over folds %s, %s: %.4f (baseline %.4f); outputs in %s",
                list(cfg.data.train_folds), where, summary["mean_best_score"], summary["mean_baseline_train_mean_r2"],
                out_dir)
    return summary


def start_run_folder(out_dir: Path, record: dict, df: pd.DataFrame, folds: np.ndarray) -> None:
    """Create the run folder with config.json and folds.csv; a folder this call created is removed again when
    either cannot be written, so a failed start leaves nothing behind."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", record)
        write_folds(out_dir / "folds.csv", df, folds)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def train_fold(cfg: RunConfig, fold: int, df: pd.DataFrame, folds: np.ndarray, rt, out_dir: Path, cache,
               record: dict, hint: str) -> dict:
    """One fold, from its resume state when there is one; a stop or out-of-memory says what to do next."""
    seed_everything(cfg.init_seed(fold))
    start = time.perf_counter()
    trainer = None
    fit_df, select_df = selection_split(cfg, fold, df[folds != fold], df[folds == fold])
    try:
        trainer = FoldTrainer(cfg, fold, fit_df, select_df, rt, out_dir, image_cache=cache, config_record=record)
        result = trainer.run()
    except torch.OutOfMemoryError as exc:  # the settings, not the code: say which options to lower
        raise ConfigError(f"fold {fold}: {rt.device} ran out of memory ({' '.join(str(exc).split())[:200]}); "
                          "lower --batch-size or --img-size, or add --grad-ckpt") from exc
    except Stopped as stop:
        epoch = trainer.progress.epoch if trainer is not None else 0
        raise Stopped(stop.signum, f"stopped by {stop.signal_name} at fold {fold} epoch {epoch}; {hint}") from None
    result["seconds"] = time.perf_counter() - start
    result["selected_on"] = cfg.train.select_on
    on = "the scored fold" if cfg.train.select_on == "fold" else f"the inner split ({len(select_df)} images)"
    logger.info("fold %d: best weighted R2 %.4f on %s at epoch %d (training-mean baseline %.4f) -> %s", fold,
                result["best_score"], on, result["best_epoch"], result["baseline_train_mean_r2"], checkpoint_name(fold))
    return result


def selection_split(cfg: RunConfig, fold: int, train_df: pd.DataFrame, val_df: pd.DataFrame):
    """(images to fit on, images to select the epoch on): the training folds and the scored fold as in the reference
    (`--select-on fold`), or an inner split of the training folds (`--select-on inner`) so that nothing is chosen
    on the fold that is then scored. The inner split is grouped like --cv-strategy and seeded per fold."""
    if cfg.train.select_on == "fold":
        return train_df, val_df
    held = inner_split(train_df, cfg.data.cv_strategy, cfg.train.inner_frac, cfg.fold_seed(fold))
    logger.info("fold %d: selecting on an inner split of %d of its %d training images (--select-on inner); the "
                "scored fold's %d images are not seen until eval", fold, held.sum(), len(train_df), len(val_df))
    return train_df[~held], train_df[held]


def summarize(results: list[dict], cfg: RunConfig) -> dict:
    """summary.json: best score per fold and their mean, with the training-mean baseline beside them."""
    return {
        "folds": {str(r["fold"]): r for r in results},
        "mean_best_score": float(np.mean([r["best_score"] for r in results])),
        "mean_baseline_train_mean_r2": float(np.mean([r["baseline_train_mean_r2"] for r in results])),
        # where mean_best_score was measured: "fold" (the scored folds: optimistic) or "inner" (inner splits)
        "selected_on": cfg.train.select_on,
        "metric": "global weighted R2 (grams, post-processed), weights "
                  + ", ".join(f"{t} {w}" for t, w in zip(TARGETS, COMPETITION_WEIGHTS, strict=True)),
        "train_folds": list(cfg.data.train_folds),
        "complete": len(results) == len(cfg.data.train_folds),  # False while folds are pending (--resume)
    }
