"""Train the 5-head DINOv2 biomass model with K-fold cross-validation.

Single process:
    python -m src.train_5head --base-path data --epochs 10 --train-folds 0 --device-type cuda
Tiny CPU run on synthetic data (no pretrained weights needed):
    python -m src.make_synthetic --out data
    python -m src.train_5head --base-path data --backbone vit_small_patch14_reg4_dinov2.lvd142m --no-pretrained \
        --img-size 56 --epochs 2 --batch-size 4 --num-workers 0 --device-type cpu
The same command anywhere, once installed: `biomass5head train --base-path data ...`.
Several GPUs (DistributedDataParallel; global batch = --batch-size x processes), or CPU processes with gloo:
    torchrun --standalone --nproc-per-node 4 -m src.train_5head --base-path data ...
Fold-parallel (one process per fold, one run folder): the same options and --output-dir, other --train-folds.

Writes into --output-dir: 5head_best_fold{k}.pth, folds.csv, config.json, log_fold{k}.csv, summary.json and
learning_curves.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from biomass5head.cli.common import prog, run_command
from biomass5head.cli.train_options import RESUME_DESTS, RESUME_OPTIONS, apply_recipe, build_parser
from biomass5head.config import (
    AugConfig,
    CacheConfig,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    PostConfig,
    RunConfig,
    TrainConfig,
)

logger = logging.getLogger(__name__)
def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Resolve parsed arguments into a RunConfig: the --recipe's values for options not given, then clipping what
    the reference's commands need clipped."""
    args = apply_recipe(args)
    epochs = args.epochs
    freeze_epochs, warmup_epochs = args.freeze_epochs, args.warmup_epochs
    if args.two_stage and not args.freeze_backbone and freeze_epochs > epochs:
        logger.warning("--freeze-epochs %d is longer than --epochs %d: clipped to %d", freeze_epochs, epochs, epochs)
        freeze_epochs = epochs
    if warmup_epochs > epochs:
        logger.warning("--warmup-epochs %d is longer than --epochs %d: clipped to %d", warmup_epochs, epochs, epochs)
        warmup_epochs = epochs
    if args.freeze_backbone and args.two_stage:
        logger.warning("--freeze-backbone wins over --two-stage: the backbone stays frozen for all epochs")
    if args.no_pretrained and args.backbone_weights:
        raise ConfigError("--no-pretrained and --backbone-weights contradict each other: choose one")
    train_folds = tuple(args.train_folds) if args.train_folds is not None else tuple(range(args.num_folds))
    return RunConfig(
        model=ModelConfig(backbone=args.backbone, grid=tuple(args.grid), img_size=args.img_size, dropout=args.dropout,
                          hidden_ratio=args.hidden_ratio, film=not args.no_film,
                          attention_pool=not args.no_attention_pool, grad_ckpt=args.grad_ckpt,
                          use_aux_heads=args.use_aux_heads, pretrained=not args.no_pretrained,
                          backbone_weights=args.backbone_weights, ridge_base=args.ridge_base,
                          tile_feature=args.tile_feature, interval_heads=args.interval_heads,
                          head_seeds=args.head_seeds),
        data=DataConfig(base_path=args.base_path, batch_size=args.batch_size, num_workers=args.num_workers,
                        cache_images=args.cache_images, prefetch_factor=args.prefetch_factor,
                        num_folds=args.num_folds, train_folds=train_folds, cv_strategy=args.cv_strategy,
                        fold_csv=args.fold_csv, check_photos=args.check_photos,
                        allow_any_aspect=args.allow_any_aspect),
        aug=AugConfig(aug_prob=args.aug_prob, stereo_correct_aug=args.stereo_correct_aug,
                      stereo_swap_prob=args.stereo_swap_prob, mixup_prob=args.mixup_prob,
                      mixup_alpha=args.mixup_alpha, cutmix_prob=args.cutmix_prob, cutmix_alpha=args.cutmix_alpha,
                      scale_aug_prob=args.scale_aug_prob, scale_range=tuple(args.scale_range),
                      scale_pad=args.scale_pad, light_aug_prob=args.light_aug_prob),
        loss=LossConfig(target_weights=tuple(args.target_weights), constraint_weight=args.constraint_weight,
                        use_focal_loss=args.use_focal_loss, use_dead_aware_loss=args.use_dead_aware_loss,
                        huber_for_dead=not args.no_huber_for_dead, aux_state_weight=args.aux_state_weight,
                        aux_month_weight=args.aux_month_weight, aux_species_weight=args.aux_species_weight,
                        use_log_target=args.use_log_target, target_transform=args.target_transform,
                        interval_weight=args.interval_weight),
        post=PostConfig(correction_threshold=args.correction_threshold, always_correct_dead=args.always_correct_dead,
                        apply_context_adjustment=args.apply_context_adjustment, reconcile=args.reconcile),
        train=TrainConfig(epochs=epochs, grad_accum=args.grad_accum, grad_clip=args.grad_clip, patience=args.patience,
                          lr=args.lr, backbone_lr=args.backbone_lr, weight_decay=args.weight_decay,
                          warmup_epochs=warmup_epochs, two_stage=args.two_stage, freeze_epochs=freeze_epochs,
                          head_lr_stage1=args.head_lr_stage1, freeze_backbone=args.freeze_backbone,
                          amp_dtype=args.amp_dtype, save_every=args.save_every, keep_last=args.keep_last,
                          select_on=args.select_on, inner_frac=args.inner_frac, refit=args.refit,
                          ridge_select=args.ridge_select,
                          compile=args.compile, ema_decay=args.ema_decay),
        cache=CacheConfig(enabled=not args.no_feature_cache, dir=args.feature_cache, bank=args.feature_bank),
        output_dir=args.output_dir,
        device_type=args.device_type,
        seed=args.seed,
        recipe=args.recipe,
    )


def resume_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The configuration of the run in --resume RUN (its config.json), with the precision it actually used; only
    RESUME_OPTIONS, which cannot change results, may be given beside it."""
    run_dir = Path(args.resume)
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if k not in ("resume", *RESUME_DESTS) and not k.startswith("_") and v != parser.get_default(k)]
    if given:
        raise ConfigError(f"--resume continues a run with its own configuration: {', '.join(given)} cannot be "
                          f"given with it (only {', '.join(RESUME_OPTIONS)})")
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there (not a run folder of train_5head)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--resume {run_dir}: {path} is not valid JSON ({exc})") from exc
    cfg = RunConfig.from_dict(raw)
    recorded = raw.get("runtime", {})
    device = args.device_type or recorded.get("device", cfg.device_type or "")
    workers = args.num_workers if args.num_workers is not None else recorded.get("num_workers_used",
                                                                                  cfg.data.num_workers)
    if (args.device_type and not recorded.get("device", "").startswith(args.device_type)) or \
            (args.num_workers is not None and args.num_workers != recorded.get("num_workers_used")):
        logger.warning("--resume with another device or number of DataLoader workers than the run used (%s, %s "
                       "workers): it continues, but its numbers will not repeat an uninterrupted run exactly",
                       recorded.get("device"), recorded.get("num_workers_used"))
    data = replace(cfg.data, num_workers=workers, base_path=args.base_path if args.base_path != parser.get_default(
        "base_path") else cfg.data.base_path)
    train = replace(cfg.train, amp_dtype=recorded.get("amp_dtype_used", cfg.train.amp_dtype),
                    save_every=args.save_every, keep_last=args.keep_last)
    return replace(cfg, data=data, train=train, output_dir=str(run_dir), device_type=device.split(":")[0] or None)


def train_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    # torchrun's other ranks: warnings and errors only, no progress bars (rank 0 shows them)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when it is first imported, which is below
        logging.getLogger().setLevel(logging.WARNING)
    from biomass5head.train.kfold import run  # here, so that --help answers without loading torch

    command = prog("python -m src.train_5head")
    world, local = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("LOCAL_WORLD_SIZE", "1")
    if world > 1:  # the hint a stop prints: resume the way it was started
        launcher = "--standalone" if str(world) == local else "<the same --nnodes/--rdzv-* options>"
        command = f"torchrun {launcher} --nproc-per-node {local} -m src.train_5head"
    if args.resume:
        return run(resume_config(args, parser), resume=True, command=command)
    return run(config_from_args(args), command=command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_command(parser, argv, lambda args: train_command(args, parser), logger)
