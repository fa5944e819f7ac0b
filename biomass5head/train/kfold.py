"""A whole training run: the run folder, folds, every fold of --train-folds, then summary.json and the plots.

`run(cfg)` is what `python -m src.train_5head` (`biomass5head train`) does once its options are parsed into a
`RunConfig`; one fold's training is `train.trainer.FoldTrainer`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from dataclasses import replace
from datetime import datetime
from functools import partial
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
from biomass5head.distributed import Dist, init_distributed, shutdown_distributed
from biomass5head.fileio import write_json
from biomass5head.interrupt import Stopped
from biomass5head.model.checkpoint import checkpoint_name, find_checkpoints
from biomass5head.model.five_head import build_model, describe
from biomass5head.plots import plot_learning_curves
from biomass5head.train.refit import RefitTrainer, refit_state_name
from biomass5head.train.resume import last_state_name
from biomass5head.train.shared_run import (
    config_differences,
    finished_folds,
    folds_in_training,
    lock_folds,
    read_summary,
    record_fold,
    run_lock,
)
from biomass5head.train.trainer import FoldTrainer

logger = logging.getLogger(__name__)

RUN_FILES = ("config.json", "folds.csv", "summary.json")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(output_dir: str | None) -> Path:
    """The run folder: the given one (refused when it holds a run's files without its config.json; one with a
    config.json may be joined, `open_run_folder`) or a new timestamped one."""
    if output_dir is None:
        base = Path("outputs") / datetime.now().strftime("5head_%Y%m%d_%H%M%S")
        path, n = base, 1
        while path.exists():
            path, n = Path(f"{base}_{n}"), n + 1
        return path
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path} exists and is not a folder")
    if path.is_dir() and not (path / "config.json").is_file():
        held = [f for f in RUN_FILES if (path / f).exists()] + [p.name for p in find_checkpoints(path).values()]
        if held:
            raise ConfigError(f"--output-dir {path} already holds a run ({', '.join(held[:4])}) without its "
                              "config.json: choose a new folder so earlier results are not overwritten")
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
    model = build_model(replace(cfg, model=replace(cfg.model, interval_heads=0)))  # (interval bins come per fold)
    logger.info("model: %s (%s weights); %s", cfg.model.backbone, cfg.model.backbone_weights or
                ("pretrained" if cfg.model.pretrained else "random"), describe(model))
    return model.mean_std


def run(cfg: RunConfig, resume: bool = False, command: str = "python -m src.train_5head") -> dict:
    """Train every fold of --train-folds; returns the summary also written to summary.json. With `resume`, the run
    folder `cfg.output_dir` exists: its folds.csv is kept, finished folds (in summary.json) are skipped and an
    unfinished fold continues from its resume state. `command` is how the user runs training (for the hint a stop
    prints). Under torchrun every rank runs this together (distributed.py); rank 0 alone writes the run folder."""
    dist = init_distributed(cfg.device_type)
    try:
        return _run(cfg, dist, resume, command)
    finally:
        shutdown_distributed()


def _run(cfg: RunConfig, dist: Dist, resume: bool, command: str) -> dict:
    rt = resolve_runtime(cfg.device_type, cfg.train.amp_dtype, cfg.data.num_workers, dist)
    df = load_train(cfg.data.base_path)
    seed_everything(cfg.seed)
    mean_std = check_backbone(cfg)  # before the run folder exists: a bad backbone or --img-size leaves nothing
    with contextlib.ExitStack() as locks:  # this process's fold locks, held until it ends
        opened = on_rank0(dist, lambda: open_run_folder(cfg, df, rt, resume, locks))
        out_dir, folds, record, done, joined = Path(opened[0]), *opened[1:]
        if dist.enabled:
            logger.info("DDP over %d ranks: global batch %d (--batch-size %d per rank) on pixels; epochs on cached "
                        "features run on every rank alike", dist.world_size, cfg.data.batch_size * dist.world_size,
                        cfg.data.batch_size)
        tiles = TileSpec(cfg.model.grid, cfg.model.img_size, *mean_std)
        cache = build_image_cache(df["abs_path"], tiles) if cfg.data.cache_images else None

        results = [done[k] for k in cfg.data.train_folds if k in done]
        hint = (f"resume with: {command} --resume {out_dir}" if not joined else
                f"resume by running the same command again: it rejoins {out_dir} and continues folds "
                f"{list(cfg.data.train_folds)} from their saved state")
        written = None
        try:
            for fold in (k for k in cfg.data.train_folds if k not in done):
                result = train_fold(cfg, fold, df, folds, rt, out_dir, cache, record, hint)
                results.append(result)
                if dist.is_main:
                    written = record_fold(out_dir, result, cfg.data.train_folds, partial(summarize, cfg=cfg))
                    if not cfg.train.keep_last:  # only now: until summary.json records the fold, its state is needed
                        (out_dir / last_state_name(fold)).unlink(missing_ok=True)
                        (out_dir / refit_state_name(fold)).unlink(missing_ok=True)
        except Stopped as stop:
            if hint in str(stop):
                raise
            raise Stopped(stop.signum, f"{stop}; {hint}") from None
    if not dist.is_main:
        return summarize(results, list(cfg.data.train_folds), cfg)
    mine = summarize(results, list(cfg.data.train_folds), cfg)
    if written is None:  # nothing trained here (e.g. --resume of a finished run): summary.json, brought up to date
        written = record_fold(out_dir, None, cfg.data.train_folds, partial(summarize, cfg=cfg))
    with run_lock(out_dir):  # the folds every process has finished so far, drawn by one process at a time
        summary = read_summary(out_dir) or written
        logs = {int(k): pd.read_csv(out_dir / f"log_fold{k}.csv") for k in summary["folds"]
                if (out_dir / f"log_fold{k}.csv").is_file()}
        plot_learning_curves(logs, out_dir / "learning_curves.png")
    where = ("on the scored folds themselves: optimistic; train with --select-on inner for an honest OOF score"
             if cfg.train.select_on == "fold" else "on the inner selection splits (not an OOF score)")
    logger.info("mean best weighted R2 over folds %s, %s: %.4f (baseline %.4f); outputs in %s",
                list(cfg.data.train_folds), where, mine["mean_best_score"], mine["mean_baseline_train_mean_r2"],
                out_dir)
    if summary["train_folds"] != list(cfg.data.train_folds):
        pending = [k for k in summary["train_folds"] if str(k) not in summary["folds"]]
        logger.info("the run's folds: %s trained%s", sorted(int(k) for k in summary["folds"]),
                    f", {pending} still to come from the other processes" if pending else "")
    return summary


def on_rank0(dist: Dist, fn):
    """fn() on rank 0 and its result on every rank; when it fails there, every rank fails with its message (the
    others would otherwise wait for a result that never comes)."""
    if not dist.enabled:
        return fn()
    outcome = None
    if dist.is_main:
        try:
            outcome = ("ok", fn())
        except Exception as exc:
            dist.broadcast(("error", str(exc)))
            raise
    outcome = dist.broadcast(outcome)
    if outcome[0] == "error":
        raise ConfigError(f"rank 0 failed: {outcome[1]}")
    return outcome[1]


def open_run_folder(cfg: RunConfig, df: pd.DataFrame, rt, resume: bool, locks: contextlib.ExitStack):
    """Check the photos, then create the run folder, join it (fold-parallel, shared_run.py) or reopen it (--resume),
    and lock the folds this process trains. Returns (run folder, folds, config.json record, finished folds)."""
    check_photos(df["abs_path"], cfg.model.grid, cfg.model.img_size, level=cfg.data.check_photos,
                 allow_any_aspect=cfg.data.allow_any_aspect, what="training photos")
    out_dir = Path(cfg.output_dir) if resume else prepare_output_dir(cfg.output_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:  # atomic: of two processes starting together, exactly one creates the folder (and may remove it again)
        out_dir.mkdir()
        created = True
    except FileExistsError:
        created = False
    try:
        with run_lock(out_dir):
            joining = not resume and (out_dir / "config.json").is_file()
            if resume and not folds_in_training(out_dir):  # what a second Ctrl-C (an immediate exit) may have left
                for leftover in out_dir.glob(".*.tmp"):
                    leftover.unlink(missing_ok=True)
            if resume or joining:
                record = json.loads((out_dir / "config.json").read_text())
                folds = read_fold_csv(out_dir / "folds.csv", df, cfg.data.num_folds)
                done = finished_folds(out_dir)
                started_with = int(record.get("runtime", {}).get("world_size", 1))  # 1 for runs older than torchrun
                if resume and started_with != rt.dist.world_size:
                    logger.warning("resuming with %d process(es) where the run had %d: steps per epoch, and so the "
                                   "learning-rate schedule of the unfinished fold, change", rt.dist.world_size,
                                   started_with)
            else:
                record, done = {**cfg.to_dict(), "runtime": rt.record()}, {}  # config.json, also in every checkpoint
                folds = assign_folds(cfg, df)
            missing = [k for k in cfg.data.train_folds if not (folds == k).any()]
            if missing:
                raise FoldError(f"--train-folds {missing}: no images in those folds")
            if joining:
                check_join(out_dir, record, cfg, done)
            lock_folds(locks, out_dir, [k for k in cfg.data.train_folds if k not in done])
            if not resume and not joining:
                start_run_folder(out_dir, record, df, folds)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    logger.info("%d images, %d folds, mode %s, device %s, precision %s, %d DataLoader workers", len(df),
                cfg.data.num_folds, cfg.train.mode, rt.device, rt.dtype_name, rt.num_workers)
    logger.info("folds:\n%s", fold_summary(df, folds))
    if resume:
        logger.info("resuming %s: folds %s finished", out_dir, sorted(done) or "none")
    else:
        logger.info("run folder: %s%s", out_dir, " (joined: fold-parallel)" if joining else "")
    return str(out_dir), folds, record, done, joining


def check_join(out_dir: Path, record: dict, cfg: RunConfig, done: dict) -> None:
    """A process may join an existing run only with its configuration (but for --train-folds, --num-workers and
    --device-type) and only for folds not yet trained."""
    diffs = config_differences(record, cfg)
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise ConfigError(f"--output-dir {out_dir} already holds a run with another configuration ({shown}): choose "
                          "a new folder so earlier results are not overwritten, or give that run's options to join "
                          "it with other --train-folds")
    clash = [k for k in cfg.data.train_folds if k in done]
    if clash:
        raise ConfigError(f"--output-dir {out_dir} already holds a run in which fold(s) {clash} are trained "
                          "(summary.json): give other --train-folds to join it, or choose a new folder")
    logger.info("joining the run in %s (same configuration): training folds %s", out_dir, list(cfg.data.train_folds))


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
    train_folds_df = df[folds != fold]
    fit_df, select_df = selection_split(cfg, fold, train_folds_df, df[folds == fold])
    try:
        trainer = FoldTrainer(cfg, fold, fit_df, select_df, rt, out_dir, image_cache=cache, config_record=record,
                              train_folds_df=train_folds_df)
        result = trainer.run()
        if cfg.train.refit:  # the same fold again on all its training images, up to the selected epoch
            seed_everything(cfg.init_seed(fold))
            trainer = RefitTrainer(cfg, fold, fit_df, select_df, result["best_epoch"] + 1, rt, out_dir,
                                   image_cache=cache, config_record=record, train_folds_df=train_folds_df)
            trainer.run()
            result.update(refit_epochs=result["best_epoch"] + 1, n_refit=len(trainer.train_df))
    except torch.OutOfMemoryError as exc:  # the settings, not the code: say which options to lower
        raise ConfigError(f"fold {fold}: {rt.device} ran out of memory ({' '.join(str(exc).split())[:200]}); "
                          "lower --batch-size or --img-size, or add --grad-ckpt") from exc
    except Stopped as stop:
        epoch = trainer.progress.epoch if trainer is not None else 0
        raise Stopped(stop.signum, f"stopped by {stop.signal_name} at fold {fold} epoch {epoch}; {hint}") from None
    result["seconds"] = time.perf_counter() - start
    result["selected_on"] = cfg.train.select_on
    on = "the scored fold" if cfg.train.select_on == "fold" else f"the inner split ({len(select_df)} images)"
    refit = f", refitted on {result['n_refit']} images" if cfg.train.refit else ""
    logger.info("fold %d: best weighted R2 %.4f on %s at epoch %d (training-mean baseline %.4f)%s -> %s", fold,
                result["best_score"], on, result["best_epoch"], result["baseline_train_mean_r2"], refit,
                checkpoint_name(fold))
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


def summarize(results: list[dict], asked: list[int], cfg: RunConfig) -> dict:
    """summary.json: best score per fold and their mean, with the training-mean baseline beside them; `asked` are
    the folds to train (of every process training the run)."""
    return {
        "folds": {str(r["fold"]): r for r in results},
        "mean_best_score": float(np.mean([r["best_score"] for r in results])),
        "mean_baseline_train_mean_r2": float(np.mean([r["baseline_train_mean_r2"] for r in results])),
        # where mean_best_score was measured: "fold" (the scored folds: optimistic) or "inner" (inner splits)
        "selected_on": cfg.train.select_on,
        "metric": "global weighted R2 (grams, post-processed), weights "
                  + ", ".join(f"{t} {w}" for t, w in zip(TARGETS, COMPETITION_WEIGHTS, strict=True)),
        "train_folds": sorted(asked),
        # False while folds are pending (--resume, or other processes of a fold-parallel run)
        "complete": {int(r["fold"]) for r in results} >= set(asked),
    }
