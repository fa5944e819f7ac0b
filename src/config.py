"""Command-line options of train_5head and the frozen dataclasses they resolve into.

`build_parser()` lists every option of the reference (`5head_arguments.md`) in its order, grouped by topic.
`config_from_args()` turns parsed arguments into a `RunConfig` whose `__post_init__` checks reject bad values
and contradictory options with a message that names the option. `RunConfig.to_dict()` is plain JSON data;
it is what `config.json` and every checkpoint carry.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from .constants import TARGETS

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "vit_base_patch14_reg4_dinov2.lvd142m"
CV_STRATEGIES = ("group_month", "group_date", "group_date_state", "group_date_state_bin", "stratified", "random")
AMP_DTYPES = ("float16", "bfloat16", "float32")


class ConfigError(ValueError):
    """An option value or a combination of options that cannot be run."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_weight(value: float, option: str) -> None:
    _check(math.isfinite(value) and value >= 0, f"{option} must be a finite number >= 0, got {value}")


def _check_prob(value: float, option: str) -> None:
    _check(0.0 <= value <= 1.0 and math.isfinite(value), f"{option} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = DEFAULT_BACKBONE
    grid: tuple[int, int] = (2, 2)
    img_size: int = 518
    dropout: float = 0.2
    hidden_ratio: float = 0.5
    film: bool = True
    attention_pool: bool = True
    grad_ckpt: bool = False
    use_aux_heads: bool = False
    pretrained: bool = True
    backbone_weights: str | None = None

    def __post_init__(self):
        _check(len(self.grid) == 2 and all(int(g) >= 1 for g in self.grid),
               f"--grid needs two integers >= 1, got {self.grid}")
        _check(self.img_size >= 14, f"--img-size must be at least 14 (one patch), got {self.img_size}")
        _check(0.0 <= self.dropout <= 0.5, f"--dropout must be in [0.0, 0.5], got {self.dropout}")
        _check(0.0 < self.hidden_ratio <= 8.0, f"--hidden-ratio must be in (0, 8], got {self.hidden_ratio}")


@dataclass(frozen=True)
class DataConfig:
    base_path: str = "./data"
    batch_size: int = 8
    num_workers: int | None = None  # None: chosen for the device (device.loader_workers)
    cache_images: bool = False
    prefetch_factor: int = 4
    num_folds: int = 5
    train_folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    cv_strategy: str = "group_month"
    fold_csv: str | None = None

    def __post_init__(self):
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.num_workers is None or self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        _check(self.prefetch_factor >= 1, f"--prefetch-factor must be >= 1, got {self.prefetch_factor}")
        _check(self.num_folds >= 2, f"--num-folds must be >= 2, got {self.num_folds}")
        _check(self.cv_strategy in CV_STRATEGIES, f"--cv-strategy must be one of {', '.join(CV_STRATEGIES)}")
        bad = [k for k in self.train_folds if not 0 <= k < self.num_folds]
        _check(not bad, f"--train-folds {bad} out of range for --num-folds {self.num_folds} "
                        f"(folds are 0..{self.num_folds - 1})")
        _check(len(set(self.train_folds)) == len(self.train_folds), f"--train-folds repeats a fold: {self.train_folds}")
        _check(len(self.train_folds) >= 1, "--train-folds needs at least one fold")


@dataclass(frozen=True)
class CacheConfig:
    """Frozen-feature cache: tile features of a frozen backbone, computed once and kept on disk."""
    enabled: bool = True
    dir: str | None = None  # None: <base-path>/.feature_cache
    bank: int = 4

    def __post_init__(self):
        _check(0 <= self.bank <= 64, f"--feature-bank must be in [0, 64], got {self.bank}")

    def resolved_dir(self, base_path: str) -> str:
        return self.dir if self.dir else str(Path(base_path) / ".feature_cache")


@dataclass(frozen=True)
class AugConfig:
    aug_prob: float = 0.5
    stereo_correct_aug: bool = False
    stereo_swap_prob: float = 0.0
    mixup_prob: float = 0.0
    mixup_alpha: float = 0.4
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0

    def __post_init__(self):
        for name in ("aug_prob", "stereo_swap_prob", "mixup_prob", "cutmix_prob"):
            _check_prob(getattr(self, name), "--" + name.replace("_", "-"))
        _check(self.mixup_prob + self.cutmix_prob <= 1.0 + 1e-9,
               f"--mixup-prob + --cutmix-prob must not exceed 1, got {self.mixup_prob + self.cutmix_prob}")
        _check(self.mixup_alpha > 0 and math.isfinite(self.mixup_alpha),
               f"--mixup-alpha must be > 0, got {self.mixup_alpha}")
        _check(self.cutmix_alpha > 0 and math.isfinite(self.cutmix_alpha),
               f"--cutmix-alpha must be > 0, got {self.cutmix_alpha}")


@dataclass(frozen=True)
class LossConfig:
    target_weights: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2)
    constraint_weight: float = 0.05
    use_focal_loss: bool = False
    use_dead_aware_loss: bool = False
    huber_for_dead: bool = True
    aux_state_weight: float = 5.0
    aux_month_weight: float = 3.0
    aux_species_weight: float = 2.0
    use_log_target: bool = False

    def __post_init__(self):
        _check(len(self.target_weights) == len(TARGETS),
               f"--target-weights needs {len(TARGETS)} values ({', '.join(TARGETS)})")
        _check(all(math.isfinite(w) and w >= 0 for w in self.target_weights) and sum(self.target_weights) > 0,
               f"--target-weights must be finite, >= 0 and have a positive sum, got {self.target_weights}")
        _check_weight(self.constraint_weight, "--constraint-weight")
        for name in ("aux_state_weight", "aux_month_weight", "aux_species_weight"):
            _check_weight(getattr(self, name), "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class PostConfig:
    correction_threshold: float = 0.15
    always_correct_dead: bool = False
    apply_context_adjustment: bool = False

    def __post_init__(self):
        _check(self.correction_threshold >= 0, f"--correction-threshold must be >= 0, got {self.correction_threshold}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    grad_accum: int = 1
    grad_clip: float = 1.0
    patience: int = 10
    lr: float = 2e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_epochs: int = 2
    two_stage: bool = False
    freeze_epochs: int = 5
    head_lr_stage1: float = 1e-3
    freeze_backbone: bool = False
    amp_dtype: str = "float16"

    def __post_init__(self):
        _check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        _check(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        _check(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        _check(self.patience >= 1, f"--patience must be >= 1, got {self.patience}")
        for name in ("lr", "backbone_lr", "head_lr_stage1"):
            value = getattr(self, name)
            _check(value > 0 and math.isfinite(value), f"--{name.replace('_', '-')} must be > 0, got {value}")
        _check_weight(self.weight_decay, "--weight-decay")
        _check(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.freeze_epochs >= 0, f"--freeze-epochs must be >= 0, got {self.freeze_epochs}")
        _check(self.amp_dtype in AMP_DTYPES, f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}")

    @property
    def mode(self) -> str:
        """'head_only', 'two_stage' or 'single_stage' (head-only wins over two-stage)."""
        if self.freeze_backbone:
            return "head_only"
        return "two_stage" if self.two_stage else "single_stage"


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    post: PostConfig = field(default_factory=PostConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output_dir: str | None = None
    device_type: str | None = None
    seed: int = 18

    def __post_init__(self):
        _check(0 <= self.seed < 2**32,
               f"--seed must be in [0, 2**32 - 1] (numpy and scikit-learn need that), got {self.seed}")
        _check(not (self.post.apply_context_adjustment and not self.model.use_aux_heads),
               "--apply-context-adjustment needs --use-aux-heads "
               "(it uses the heads' State/Month/Species probabilities)")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (tuples become lists), the same in config.json and in checkpoints."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """Inverse of to_dict; unknown keys are ignored so older checkpoints keep loading."""
        parts = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if sub is not None and isinstance(value, dict):
                known = {g.name for g in dataclasses.fields(sub)}
                kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items() if k in known}
                value = sub(**kwargs)
            parts[f.name] = value
        return cls(**parts)


def _plain(value):
    """Tuples to lists, recursively: what JSON would give back, so config.json and checkpoints agree."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build_parser() -> argparse.ArgumentParser:
    """The train_5head parser, grouped and ordered as in the reference."""
    p = argparse.ArgumentParser(prog="python -m src.train_5head", description="Train the 5-head DINOv2 biomass model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Paths")
    g.add_argument("--base-path", default="./data", help="directory with train.csv and train/")
    g.add_argument("--output-dir", default=None, help="run folder (default ./outputs/5head_YYYYMMDD_HHMMSS/)")

    g = p.add_argument_group("Model architecture")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm ViT name")
    g.add_argument("--grid", type=int, nargs=2, default=[2, 2], metavar=("ROWS", "COLS"), help="tile grid per view")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout in the heads (0.0-0.5)")
    g.add_argument("--hidden-ratio", type=float, default=0.5, help="hidden = 2 x D x ratio")
    g.add_argument("--no-film", action="store_true", help="disable FiLM conditioning between views")
    g.add_argument("--no-attention-pool", action="store_true", help="mean pooling over tiles instead of attention")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the backbone")
    g.add_argument("--backbone-weights", default=None, metavar="FILE",
                   help="local .safetensors/.pth backbone weights (timm or original DINOv2 layout)")
    g.add_argument("--no-pretrained", action="store_true", help="random backbone initialisation")

    g = p.add_argument_group("Training configuration")
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--batch-size", type=int, default=8, help="batch size per device")
    g.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers (default: 4 on a GPU as in the reference; on a CPU one per 4 usable "
                        "cores, at least 1: more would take cores from the model)")
    g.add_argument("--cache-images", action="store_true", help="keep decoded views in RAM")
    g.add_argument("--prefetch-factor", type=int, default=4, help="DataLoader prefetch factor (workers > 0)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    g.add_argument("--patience", type=int, default=10, help="early stopping patience in epochs")
    g.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="frozen-feature cache folder (default <base-path>/.feature_cache)")
    g.add_argument("--no-feature-cache", action="store_true",
                   help="always run the frozen backbone on pixels instead of reusing cached tile features")
    g.add_argument("--feature-bank", type=int, default=4, metavar="K",
                   help="pre-augmented variants per photo cached when augmentation is on (0: run uncached)")

    g = p.add_argument_group("Learning rates")
    g.add_argument("--lr", type=float, default=2e-4, help="head LR (single stage / stage 2)")
    g.add_argument("--backbone-lr", type=float, default=1e-5, help="backbone LR (single stage / stage 2)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-epochs", type=int, default=2, help="linear warmup epochs before cosine")

    g = p.add_argument_group("2-stage training")
    g.add_argument("--two-stage", action="store_true", help="heads only first, then full fine-tuning")
    g.add_argument("--freeze-epochs", type=int, default=5, help="epochs of stage 1")
    g.add_argument("--head-lr-stage1", type=float, default=1e-3, help="head LR in stage 1 and head-only training")
    g.add_argument("--freeze-backbone", action="store_true", help="backbone frozen for all epochs")

    g = p.add_argument_group("Auxiliary heads")
    g.add_argument("--use-aux-heads", action="store_true", help="State, Month and Species heads")
    g.add_argument("--aux-state-weight", type=float, default=5.0)
    g.add_argument("--aux-month-weight", type=float, default=3.0)
    g.add_argument("--aux-species-weight", type=float, default=2.0)
    g.add_argument("--apply-context-adjustment", action="store_true",
                   help="rescale Dead and Clover by the predicted context's training ratios")

    g = p.add_argument_group("Loss function")
    g.add_argument("--target-weights", type=float, nargs=5, default=[0.2] * 5, metavar="W",
                   help="loss weights for Green, Dead, Clover, GDM, Total")
    g.add_argument("--constraint-weight", type=float, default=0.05)
    g.add_argument("--use-focal-loss", action="store_true")
    g.add_argument("--use-dead-aware-loss", action="store_true")
    g.add_argument("--no-huber-for-dead", action="store_true")

    g = p.add_argument_group("Post-processing")
    g.add_argument("--correction-threshold", type=float, default=0.15)
    g.add_argument("--always-correct-dead", action="store_true")

    g = p.add_argument_group("Augmentation")
    g.add_argument("--img-size", type=int, default=518, help="tile size fed to the backbone")
    g.add_argument("--aug-prob", type=float, default=0.5)
    g.add_argument("--stereo-correct-aug", action="store_true", help="photometric transforms independent per view")
    g.add_argument("--stereo-swap-prob", type=float, default=0.0)

    g = p.add_argument_group("Target normalization")
    g.add_argument("--use-log-target", action="store_true", help="learn log1p(grams)")

    g = p.add_argument_group("MixUp/CutMix (partners share Species, month and State)")
    g.add_argument("--mixup-prob", type=float, default=0.0, help="MixUp probability per training image")
    g.add_argument("--mixup-alpha", type=float, default=0.4)
    g.add_argument("--cutmix-prob", type=float, default=0.0,
                   help="CutMix probability per training image (with --mixup-prob at most 1 in total)")
    g.add_argument("--cutmix-alpha", type=float, default=1.0)

    g = p.add_argument_group("AMP")
    g.add_argument("--amp-dtype", default="float16", choices=AMP_DTYPES,
                   help="autocast dtype (float32 turns autocast off). On a CPU: bfloat16 where the CPU has it natively "
                        "(AMX/AVX512-BF16), float32 elsewhere; an explicit bfloat16 runs anyway, with a warning")

    g = p.add_argument_group("Cross-validation")
    g.add_argument("--num-folds", type=int, default=5)
    g.add_argument("--train-folds", type=int, nargs="+", default=None, help="folds to train (default: all)")
    g.add_argument("--cv-strategy", default="group_month", choices=CV_STRATEGIES)
    g.add_argument("--fold-csv", default=None, help="CSV with sample_id_prefix,fold (overrides --cv-strategy)")

    g = p.add_argument_group("Device & misc")
    g.add_argument("--device-type", default=None, choices=("cuda", "mps", "cpu"), help="default: auto-detect")
    g.add_argument("--seed", type=int, default=18)
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Resolve parsed arguments into a RunConfig, clipping what the reference's commands need clipped."""
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
                          backbone_weights=args.backbone_weights),
        data=DataConfig(base_path=args.base_path, batch_size=args.batch_size, num_workers=args.num_workers,
                        cache_images=args.cache_images, prefetch_factor=args.prefetch_factor,
                        num_folds=args.num_folds, train_folds=train_folds, cv_strategy=args.cv_strategy,
                        fold_csv=args.fold_csv),
        aug=AugConfig(aug_prob=args.aug_prob, stereo_correct_aug=args.stereo_correct_aug,
                      stereo_swap_prob=args.stereo_swap_prob, mixup_prob=args.mixup_prob,
                      mixup_alpha=args.mixup_alpha, cutmix_prob=args.cutmix_prob, cutmix_alpha=args.cutmix_alpha),
        loss=LossConfig(target_weights=tuple(args.target_weights), constraint_weight=args.constraint_weight,
                        use_focal_loss=args.use_focal_loss, use_dead_aware_loss=args.use_dead_aware_loss,
                        huber_for_dead=not args.no_huber_for_dead, aux_state_weight=args.aux_state_weight,
                        aux_month_weight=args.aux_month_weight, aux_species_weight=args.aux_species_weight,
                        use_log_target=args.use_log_target),
        post=PostConfig(correction_threshold=args.correction_threshold, always_correct_dead=args.always_correct_dead,
                        apply_context_adjustment=args.apply_context_adjustment),
        train=TrainConfig(epochs=epochs, grad_accum=args.grad_accum, grad_clip=args.grad_clip, patience=args.patience,
                          lr=args.lr, backbone_lr=args.backbone_lr, weight_decay=args.weight_decay,
                          warmup_epochs=warmup_epochs, two_stage=args.two_stage, freeze_epochs=freeze_epochs,
                          head_lr_stage1=args.head_lr_stage1, freeze_backbone=args.freeze_backbone,
                          amp_dtype=args.amp_dtype),
        cache=CacheConfig(enabled=not args.no_feature_cache, dir=args.feature_cache, bank=args.feature_bank),
        output_dir=args.output_dir,
        device_type=args.device_type,
        seed=args.seed,
    )
