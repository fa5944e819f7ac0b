"""Training of one fold: model, optimiser per stage, epochs, validation in grams, early stopping, best checkpoint."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from biomass5head.config import RunConfig
from biomass5head.constants import AUX_HEADS, TARGETS
from biomass5head.data.augment import augment_from_config
from biomass5head.data.datasets import BiomassDataset, FeatureDataset, make_loader, set_epoch
from biomass5head.data.feature_cache import FeatureCache, ensure_features, plan_feature_path, state_dict_digest
from biomass5head.data.images import TileSpec
from biomass5head.data.mixing import PairMixer, build_partner_index
from biomass5head.device import Runtime
from biomass5head.fileio import write_csv
from biomass5head.metrics import compute_metrics
from biomass5head.model.checkpoint import checkpoint_name, save_checkpoint
from biomass5head.model.five_head import build_model
from biomass5head.model.intervals import IntervalBins, interval_accuracy
from biomass5head.model.postprocess import apply_postprocess, compute_context_ratios
from biomass5head.model.predict import gather_predictions, predict
from biomass5head.model.targets import TargetTransform
from biomass5head.train.engine import cosine_with_warmup, epoch_row, train_one_epoch
from biomass5head.train.losses import BiomassLoss
from biomass5head.train.resume import Progress, last_state_name, load_state, save_state, set_rng_states, snapshot
from biomass5head.train.ridge_fit import fit_fold_ridge
from biomass5head.train.stages import Stage, build_optimizer, group_lr, plan_stages

logger = logging.getLogger(__name__)

SAVE_INTERVAL_S = 60.0  # at most one best-checkpoint write per minute while a fold trains (all at its end)


class FoldTrainer:
    """Everything one fold needs; `run()` trains it and returns the fold's summary."""

    def __init__(self, cfg: RunConfig, fold: int, train_df: pd.DataFrame, val_df: pd.DataFrame, runtime: Runtime,
                 out_dir: Path, image_cache: dict | None = None, config_record: dict | None = None,
                 train_folds_df: pd.DataFrame | None = None):
        self.cfg, self.fold, self.out_dir = cfg, fold, Path(out_dir)
        self.seed = cfg.fold_seed(fold)
        self.runtime, self.device, self.dist = runtime, runtime.device, runtime.dist
        self.config_record = config_record if config_record is not None else cfg.to_dict()
        self.train_df, self.val_df = train_df.reset_index(drop=True), val_df.reset_index(drop=True)
        self.ridge_df = self.train_df  # --ridge-select holdout: the images its choice fits on (refit.py: fewer)
        # every image of the fold's training folds, however they are split for selection (--ridge-select cv)
        self.train_folds_df = (self.train_df if train_folds_df is None else train_folds_df).reset_index(drop=True)
        self.transform = TargetTransform.fit(self.train_df[list(TARGETS)].to_numpy(np.float64),
                                             kind=cfg.loss.transform_kind)
        self.context_ratios = compute_context_ratios(self.train_df) if cfg.model.use_aux_heads else None
        self.bins = (IntervalBins.fit(self.train_df[list(TARGETS)].to_numpy(np.float64), cfg.model.interval_heads)
                     if cfg.model.interval_heads else None)  # --interval-heads: this fold's bins, in its checkpoint
        self.model = build_model(cfg, interval_bins=self.bins).to(self.device)
        if cfg.train.compile:
            self.model.compile_backbone()
        self.tiles = TileSpec(cfg.model.grid, cfg.model.img_size, *self.model.mean_std)
        self.loss_fn = self._build_loss()
        self.train_loader, self.val_loader = self._build_loaders(image_cache)
        self.feature_plan = plan_feature_path(cfg)
        self._feature_loaders = None
        self._train_model = self.model  # what the current stage trains (the model, or DDP over it under torchrun)
        self.ema = None  # --ema-decay: the weight average (AveragedModel), made when training starts
        self._best, self._last_write = None, -math.inf  # best weights not yet written, time of the last write
        self._snapshot, self._last_state_write = None, time.monotonic()  # resume state not yet written
        self.last_path = self.out_dir / last_state_name(fold)
        self.log_path = self.out_dir / f"log_fold{fold}.csv"
        self.stop_epoch = math.inf  # (train.refit: the refit pass ends after the selected epoch)
        self.progress = Progress()
        self.rows: list[dict] = []

    def _build_loss(self) -> BiomassLoss:
        lc = self.cfg.loss
        aux = ({"state": lc.aux_state_weight, "month": lc.aux_month_weight, "species": lc.aux_species_weight}
               if self.cfg.model.use_aux_heads else None)
        return BiomassLoss(self.transform, target_weights=lc.target_weights, constraint_weight=lc.constraint_weight,
                           use_focal=lc.use_focal_loss, use_dead_aware=lc.use_dead_aware_loss,
                           huber_for_dead=lc.huber_for_dead, aux_weights=aux, interval_bins=self.bins,
                           interval_weight=lc.interval_weight)

    def _build_loaders(self, image_cache):
        a, d, seed = self.cfg.aug, self.cfg.data, self.seed
        augment = augment_from_config(a, seed=seed)
        mixer = PairMixer(mixup_prob=a.mixup_prob, mixup_alpha=a.mixup_alpha, cutmix_prob=a.cutmix_prob,
                          cutmix_alpha=a.cutmix_alpha, partners=build_partner_index(self.train_df), seed=seed + 1)
        train_ds = BiomassDataset(self.train_df, self.tiles, augment=augment, mixer=mixer if mixer.enabled else None,
                                  image_cache=image_cache)
        val_ds = BiomassDataset(self.val_df, self.tiles, image_cache=image_cache)
        pin = self.device.type == "cuda"
        common = dict(batch_size=d.batch_size, num_workers=self.runtime.num_workers, prefetch_factor=d.prefetch_factor,
                      pin_memory=pin, rank=self.dist.rank, world_size=self.dist.world_size)  # sharded under torchrun
        return (make_loader(train_ds, shuffle=True, seed=seed, **common),
                make_loader(val_ds, shuffle=False, seed=seed, **common))

    def loaders_for(self, stage: Stage):
        """(train, val) loaders of a stage: cached features while the backbone is frozen (when the plan allows),
        pixels otherwise."""
        if stage.backbone_trainable or not self.feature_plan.use:
            return self.train_loader, self.val_loader
        if self._feature_loaders is None:
            self._feature_loaders = self._build_feature_loaders()
        return self._feature_loaders

    def _feature_cache(self) -> tuple[str, dict, dict]:
        """(cache root, FeatureCache key, ensure_features arguments) of this fold's frozen backbone."""
        cfg = self.cfg
        key = dict(backbone=cfg.model.backbone, weights_digest=state_dict_digest(self.model.backbone),
                   tiles=self.tiles, compute_dtype=self.runtime.dtype_name, tile_feature=cfg.model.tile_feature)
        common = dict(tiles=self.tiles, runtime=self.runtime, batch_size=cfg.data.batch_size, seed=cfg.seed)
        return cfg.cache.resolved_dir(cfg.data.base_path), key, common

    def fit_ridge_base(self) -> tuple[float, str]:
        """--ridge-base: fit the model's ridge; (alpha, rows) as --ridge-select chose them (train/ridge_fit.py)."""
        return fit_fold_ridge(self)

    def bank_features(self, paths) -> dict:
        """{path: {aug0..augK-1: (2, T, D)}} of the feature bank the heads train on, from the cache or computed now."""
        root, key, common = self._feature_cache()
        augment = augment_from_config(self.cfg.aug, swap=False)  # (the swap is applied on features)
        bank = FeatureCache(root, **key, aug_key=self.feature_plan.aug_key)
        return ensure_features(bank, self.model, paths, self.feature_plan.variants, augment=augment,
                               desc=f"fold {self.fold} feature bank", **common)

    def _build_feature_loaders(self):
        cfg, plan = self.cfg, self.feature_plan
        root, key, common = self._feature_cache()
        train_paths, val_paths = self.train_df["abs_path"], self.val_df["abs_path"]
        originals = FeatureCache(root, **key)
        if plan.aug_key:
            table = ensure_features(originals, self.model, val_paths, ["id"], desc=f"fold {self.fold} val features",
                                    **common)
            for path, variants in self.bank_features(train_paths).items():
                table.setdefault(path, {}).update(variants)  # (a refit trains on its selection images too)
        else:
            table = ensure_features(originals, self.model, list(train_paths) + list(val_paths), ["id"],
                                    desc=f"fold {self.fold} features", **common)
        train_ds = FeatureDataset(self.train_df, table, plan.variants, swap_prob=cfg.aug.stereo_swap_prob)
        val_ds = FeatureDataset(self.val_df, table, ["id"])
        seed = self.seed
        # Features are small arrays in RAM: worker processes would only add start-up time. Under torchrun every rank
        # runs the same cached epochs (replicated: see `wrap_for_training`).
        common = dict(batch_size=cfg.data.batch_size, num_workers=0, prefetch_factor=1)
        return (make_loader(train_ds, shuffle=True, seed=seed, **common),
                make_loader(val_ds, shuffle=False, seed=seed, **common))

    def validate(self, loader=None) -> dict:
        """Validation metrics in grams, raw and after the post-processing the options select."""
        loader = loader or self.val_loader
        out = predict(self.evaluated, loader, self.runtime, self.transform, grid=self.tiles.grid,
                      desc=f"fold {self.fold} val")
        if self._sharded(loader):  # each rank predicted its share
            out = gather_predictions(self.dist.all_gather(out))
        raw = compute_metrics(out["true"], out["pred"])
        p = self.cfg.post
        context = (out["probs"], self.context_ratios) if p.apply_context_adjustment else None
        post_pred = apply_postprocess(out["pred"], correction_threshold=p.correction_threshold,
                                      always_correct_dead=p.always_correct_dead, context=context,
                                      reconcile=p.reconcile)
        post = compute_metrics(out["true"], post_pred)
        acc = {}
        for head, probs in out["probs"].items():
            if head == "interval":
                continue
            labels = self.val_df[AUX_HEADS[head].column].to_numpy()
            valid = labels >= 0
            if valid.any():
                acc[f"val_acc_{head}"] = float((probs.argmax(1)[valid] == labels[valid]).mean())
        if self.bins is not None and len(out["true"]):
            acc.update({f"val_{k}": v for k, v in interval_accuracy(self.bins, out["probs"]["interval"],
                                                                      out["true"]).items()})
        return {"raw": raw, "post": post, "acc": acc}

    def baseline_score(self) -> float:
        """Primary score of predicting the training fold's mean: the bar a model must clear."""
        mean = self.train_df[list(TARGETS)].to_numpy(np.float64).mean(0)
        true = self.val_df[list(TARGETS)].to_numpy(np.float64)
        return compute_metrics(true, np.tile(mean, (len(true), 1)))["weighted_r2"]

    def run(self) -> dict:
        """Train all stages with early stopping, from the fold's resume state when there is one; returns the fold's
        summary (best score, epoch, baseline)."""
        cfg = self.cfg
        scaler = self.runtime.grad_scaler()
        baseline = self.baseline_score()
        state = self.dist.broadcast(load_state(self.last_path) if self.dist.is_main else None)  # rank 0's file
        p = self.progress = state["progress"] if state else Progress()
        if state:
            self.rows = state["rows"]
            logger.info("fold %d: resuming at epoch %d from %s", self.fold, p.epoch, self.last_path.name)
        logger.info("fold %d: %d train / %d val images; training-mean baseline R2 %.4f", self.fold,
                    len(self.train_df), len(self.val_df), baseline)
        logger.info("%s", self.feature_plan.message)
        if self.bins is not None:
            logger.info("fold %d: interval bins per target: %s", self.fold, self.bins.describe())
        if self.model.ridge is not None and not state:  # (a resumed fold's ridge comes with its saved weights)
            self.fit_ridge_base()
        if cfg.train.ema_decay:  # after the ridge fit: the average starts from the weights training starts from
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
                                     use_buffers=True)
        finished = False
        try:
            for index, stage in enumerate(plan_stages(cfg)):
                if index < p.stage_index:
                    continue
                if p.epoch >= self.stop_epoch:
                    break
                self.model.set_backbone_trainable(stage.backbone_trainable)
                train_loader, val_loader = self.loaders_for(stage)
                self._train_model = self.wrap_for_training(train_loader)
                optimizer = build_optimizer(self.model, stage, cfg.train.weight_decay)
                steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
                warmup = min(cfg.train.warmup_epochs, stage.epochs) * steps_per_epoch
                scheduler = cosine_with_warmup(optimizer, warmup, stage.epochs * steps_per_epoch)
                if state:  # everything as it was at the end of the saved epoch
                    self._restore(state, optimizer, scheduler, scaler)
                    state = None
                else:  # patience restarts with each stage: unfreezing changes what the model can reach
                    p.stage_index, p.epoch_in_stage, p.stale = index, 0, 0
                while p.epoch_in_stage < stage.epochs and p.stale < cfg.train.patience and p.epoch < self.stop_epoch:
                    self._train_epoch(p, stage, train_loader, val_loader, optimizer, scheduler, scaler)
                    if self.dist.is_main:  # only rank 0 writes the run folder
                        self._snapshot = snapshot(p, self.model, optimizer, scheduler, scaler, self._loaders(),
                                                  self.rows, ema=self.ema)
                        if time.monotonic() - self._last_state_write >= cfg.train.save_every:
                            self._write_state()
                if p.stale >= cfg.train.patience:
                    logger.info("fold %d: no improvement for %d epochs: stopping %s", self.fold, p.stale, stage.name)
            finished = True
        finally:  # the best weights so far reach the disk even when training stops, and what resuming needs
            self._flush_best()
            if not finished:
                self._write_state()
        if cfg.train.keep_last or cfg.train.refit:
            self._write_state()  # the fold's final state: to train it further by hand, or to resume after it
        return {"fold": self.fold, "best_score": p.best, "best_epoch": p.best_epoch, "epochs_run": p.epoch,
                "baseline_train_mean_r2": baseline, "n_train": len(self.train_df), "n_val": len(self.val_df)}

    def _train_epoch(self, p: Progress, stage: Stage, train_loader, val_loader, optimizer, scheduler, scaler) -> None:
        """One epoch of a stage, its validation, early-stopping bookkeeping and log row."""
        cfg = self.cfg
        set_epoch(train_loader, p.epoch)
        lrs = {"lr_head": group_lr(optimizer, "head"), "lr_backbone": group_lr(optimizer, "backbone")}
        shared = self._train_model is not self.model  # DDP: the epoch's losses are summed over the ranks
        tr = train_one_epoch(self._train_model, train_loader, self.loss_fn, optimizer, scheduler, self.runtime, scaler,
                             grad_accum=cfg.train.grad_accum, grad_clip=cfg.train.grad_clip, epoch=p.epoch,
                             desc=f"fold {self.fold} {stage.name} ep {p.epoch}", dist=self.dist if shared else None,
                             on_step=(lambda: self.ema.update_parameters(self.model)) if self.ema else None)
        val = self.validate(val_loader)
        score = self.dist.broadcast(val["post"]["weighted_r2"])  # rank 0 decides, so every rank stops alike
        improved = self.improved(score, p)
        if improved:
            p.best, p.best_epoch, p.stale = score, p.epoch, 0
            self._save(p.epoch, score, val)
        else:
            p.stale += 1
        self._log_epoch(p.epoch, stage, lrs, tr, val, improved)
        p.epoch += 1
        p.epoch_in_stage += 1

    def improved(self, score: float, p: Progress) -> bool:
        """Whether this epoch's weights become the fold's best (and reset early stopping)."""
        return score > p.best

    def wrap_for_training(self, loader):
        """The module a stage trains. Under torchrun on pixels: DistributedDataParallel over the model (each rank
        takes its share of every batch; gradients are averaged). On cached features the model itself, on every rank:
        a cached step of the heads costs about what exchanging their gradients does, so each rank runs the same epoch
        (same seed, same batches) instead of a share of it: 251 vs 405 ms per epoch on 2 gloo ranks
        (benchmarks/bench_ddp.py measures both)."""
        if not self._sharded(loader):
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    @property
    def evaluated(self):
        """The weights validation scores and the best checkpoint keeps: the average under --ema-decay."""
        return self.ema.module if self.ema is not None else self.model

    def _sharded(self, loader) -> bool:
        """Whether each rank reads its own share of `loader` (pixels under torchrun; cached features are replicated)."""
        return self.dist.enabled and isinstance(loader.dataset, BiomassDataset)

    def _loaders(self) -> dict:
        """Every DataLoader of the fold by name (their generators decide shuffling and worker seeds)."""
        named = {"train": self.train_loader, "val": self.val_loader}
        if self._feature_loaders is not None:
            named.update(feature_train=self._feature_loaders[0], feature_val=self._feature_loaders[1])
        return named

    def _restore(self, state: dict, optimizer, scheduler, scaler) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"], self._loaders())

    def _write_state(self) -> None:
        """Write the last epoch-end snapshot (after the best weights it refers to)."""
        if self._snapshot is None:
            return
        self._flush_best()
        save_state(self.last_path, self._snapshot)
        self._snapshot, self._last_state_write = None, time.monotonic()

    def _save(self, epoch: int, score: float, val: dict) -> None:
        """Keep the new best weights; write them at once when the last write is SAVE_INTERVAL_S old, else when the
        fold ends (`_flush_best`). A cached epoch takes a fraction of a second and torch.save of a whole ViT far
        longer, so writing every improvement would dominate head-only training. Rank 0 alone keeps and writes them."""
        if not self.dist.is_main:
            return
        weights = self.evaluated.state_dict()
        self._best = dict(model_state={k: v.detach().to("cpu", copy=True) for k, v in weights.items()}, epoch=epoch,
                          best_score=score, metrics={"raw": val["raw"], "post": val["post"]})
        if time.monotonic() - self._last_write >= SAVE_INTERVAL_S:
            self._flush_best()

    def _flush_best(self) -> None:
        if self._best is None:
            return
        save_checkpoint(self.out_dir / checkpoint_name(self.fold), config=self.config_record, fold=self.fold,
                        target_transform=self.transform.to_dict(), context_ratios=self.context_ratios,
                        interval_bins=self.bins.to_dict() if self.bins else None, **self._best)
        self._best, self._last_write = None, time.monotonic()

    def _log_epoch(self, epoch: int, stage: Stage, lrs: dict, tr: dict, val: dict, improved: bool) -> None:
        row = epoch_row(epoch, stage.name, lrs, tr, val, improved)
        self.rows.append(row)
        if self.dist.is_main:
            write_csv(self.log_path, pd.DataFrame(self.rows))
        acc = " ".join(f"{k[8:]} {v:.2f}" for k, v in val["acc"].items() if not k.startswith("val_acc_interval_"))
        logger.info("fold %d ep %d [%s] loss %.4f | val R2 %.4f (raw %.4f)%s | %.1f img/s%s", self.fold, epoch,
                    stage.name, tr["total"], row["val_weighted_r2"], row["val_weighted_r2_raw"],
                    f" | acc {acc}" if acc else "", tr["samples_per_s"], " *" if improved else "")
