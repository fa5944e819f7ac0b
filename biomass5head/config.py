"""The resolved configuration of a run: frozen dataclasses, one per topic, gathered in `RunConfig`.

`cli/train.py` turns the command line into a `RunConfig` (`config_from_args`); each dataclass's `__post_init__`
rejects bad values and contradictory options with a message that names the option. Evaluation and prediction
read a run's `RunConfig` back from its config.json and override it with `dataclasses.replace`.
`RunConfig.to_dict()` is plain JSON data; it is what `config.json` and every checkpoint carry.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from biomass5head.constants import CV_STRATEGIES, TARGETS

DEFAULT_BACKBONE = "vit_base_patch14_reg4_dinov2.lvd142m"
AMP_DTYPES = ("float16", "bfloat16", "float32")
SELECT_ON = ("fold", "inner")
RIDGE_SELECT = ("holdout", "cv")  # --ridge-select: how the ridge base's rows and alpha are chosen
TARGET_TRANSFORMS = ("identity", "log1p", "sqrt")
RECIPES = ("reference", "robust")
# What a tile gives the heads: the CLS token (the reference), the mean of its patch tokens, or both side by side.
TILE_FEATURES = ("cls", "patch_mean", "cls_patch_mean")
# --scale-pad: what fills the border a zoom-out leaves (data.augment): the photo's own edge mirrored, or neutral grey.
SCALE_PADS = ("reflect", "grey")


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
    ridge_base: bool = False  # heads learn a residual over a closed-form ridge fit on the frozen features
    tile_feature: str = "cls"  # TILE_FEATURES
    interval_heads: int = 0  # > 0: up to this many interval bins per target, classified by auxiliary heads
    head_seeds: int = 1  # copies of the heads, each from its own initialisation; the prediction is their mean

    def __post_init__(self):
        _check(len(self.grid) == 2 and all(int(g) >= 1 for g in self.grid),
               f"--grid needs two integers >= 1, got {self.grid}")
        _check(self.img_size >= 14, f"--img-size must be at least 14 (one patch), got {self.img_size}")
        _check(0.0 <= self.dropout <= 0.5, f"--dropout must be in [0.0, 0.5], got {self.dropout}")
        _check(0.0 < self.hidden_ratio <= 8.0, f"--hidden-ratio must be in (0, 8], got {self.hidden_ratio}")
        _check(self.tile_feature in TILE_FEATURES,
               f"--tile-feature must be one of {', '.join(TILE_FEATURES)}, got {self.tile_feature}")
        _check(1 <= self.head_seeds <= 32, f"--head-seeds must be 1-32, got {self.head_seeds}")
        _check(self.interval_heads == 0 or 2 <= self.interval_heads <= 50,
               f"--interval-heads must be 0 (off) or 2-50 bins, got {self.interval_heads}")


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
    check_photos: str = "header"  # "header" or "full" (decode every photo) before training
    allow_any_aspect: bool = False

    def __post_init__(self):
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.num_workers is None or self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        _check(self.prefetch_factor >= 1, f"--prefetch-factor must be >= 1, got {self.prefetch_factor}")
        _check(self.num_folds >= 2, f"--num-folds must be >= 2, got {self.num_folds}")
        _check(self.cv_strategy in CV_STRATEGIES, f"--cv-strategy must be one of {', '.join(CV_STRATEGIES)}")
        _check(self.check_photos in ("header", "full"), "--check-photos must be header or full")
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
    scale_aug_prob: float = 0.0  # > 0: random zoom out (padded) / in, identical on both views
    scale_range: tuple[float, float] = (0.75, 1.25)
    scale_pad: str = "reflect"  # data.augment.SCALE_PADS
    light_aug_prob: float = 0.0  # > 0: a shadow and a daylight white balance, identical on both views

    @property
    def augmenting(self) -> bool:
        """Whether training photos are augmented (beyond the left/right swap, which works on features too)."""
        return self.aug_prob > 0 or self.scale_aug_prob > 0 or self.light_aug_prob > 0

    def __post_init__(self):
        for name in ("aug_prob", "stereo_swap_prob", "mixup_prob", "cutmix_prob", "scale_aug_prob", "light_aug_prob"):
            _check_prob(getattr(self, name), "--" + name.replace("_", "-"))
        _check(self.mixup_prob + self.cutmix_prob <= 1.0 + 1e-9,
               f"--mixup-prob + --cutmix-prob must not exceed 1, got {self.mixup_prob + self.cutmix_prob}")
        _check(self.mixup_alpha > 0 and math.isfinite(self.mixup_alpha),
               f"--mixup-alpha must be > 0, got {self.mixup_alpha}")
        _check(self.cutmix_alpha > 0 and math.isfinite(self.cutmix_alpha),
               f"--cutmix-alpha must be > 0, got {self.cutmix_alpha}")
        _check(len(self.scale_range) == 2 and 0.25 <= self.scale_range[0] <= self.scale_range[1] <= 4.0,
               f"--scale-range needs LOW HIGH with 0.25 <= LOW <= HIGH <= 4, got {list(self.scale_range)}")
        _check(self.scale_pad in SCALE_PADS,
               f"--scale-pad must be one of {', '.join(SCALE_PADS)}, got {self.scale_pad}")


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
    target_transform: str | None = None  # identity, log1p or sqrt; None: log1p with use_log_target, else identity
    interval_weight: float = 0.3  # weight of the interval heads' mean cross-entropy (with --interval-heads)

    @property
    def transform_kind(self) -> str:
        return self.target_transform or ("log1p" if self.use_log_target else "identity")

    def __post_init__(self):
        _check(self.target_transform in (None, *TARGET_TRANSFORMS),
               f"--target-transform must be one of {', '.join(TARGET_TRANSFORMS)}, got {self.target_transform}")
        _check(not (self.use_log_target and self.target_transform not in (None, "log1p")),
               f"--use-log-target contradicts --target-transform {self.target_transform}: give one of them")
        _check(len(self.target_weights) == len(TARGETS),
               f"--target-weights needs {len(TARGETS)} values ({', '.join(TARGETS)})")
        _check(all(math.isfinite(w) and w >= 0 for w in self.target_weights) and sum(self.target_weights) > 0,
               f"--target-weights must be finite, >= 0 and have a positive sum, got {self.target_weights}")
        _check_weight(self.constraint_weight, "--constraint-weight")
        _check_weight(self.interval_weight, "--interval-weight")
        for name in ("aux_state_weight", "aux_month_weight", "aux_species_weight"):
            _check_weight(getattr(self, name), "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class PostConfig:
    correction_threshold: float = 0.15
    always_correct_dead: bool = False
    apply_context_adjustment: bool = False
    reconcile: bool = False  # --reconcile (model.postprocess.reconcile_targets)

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
    save_every: float = 300.0  # seconds between resume-state writes at epoch ends
    keep_last: bool = False
    select_on: str = "fold"  # "fold" (the reference: the scored fold) or "inner" (an inner split of the training folds)
    inner_frac: float = 0.2
    refit: bool = False  # with select_on inner: train each fold again on all its training images (train/refit.py)
    ridge_select: str = "holdout"  # --ridge-base: rows and alpha chosen on the selection images, or "cv" (ridge_fit.py)
    compile: bool = False  # torch.compile the backbone (pixel epochs)
    ema_decay: float = 0.0  # > 0: an exponential moving average of the weights is validated and saved

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
        _check(0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1) (0: off), got {self.ema_decay}")
        _check(self.amp_dtype in AMP_DTYPES, f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}")
        _check(self.select_on in SELECT_ON, f"--select-on must be one of {', '.join(SELECT_ON)}, got {self.select_on}")
        _check(0.0 < self.inner_frac <= 0.5, f"--inner-frac must be in (0, 0.5], got {self.inner_frac}")
        _check(self.ridge_select in RIDGE_SELECT,
               f"--ridge-select must be one of {', '.join(RIDGE_SELECT)}, got {self.ridge_select}")
        _check(not self.refit or self.select_on == "inner",
               "--refit needs --select-on inner (it retrains up to the epoch chosen on the inner split)")
        _check(self.save_every >= 0 and math.isfinite(self.save_every),
               f"--save-every must be a number of seconds >= 0, got {self.save_every}")

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
    recipe: str = "reference"  # the bundle of defaults the options were resolved from (cli/train.py: RECIPE_DEFAULTS)

    def __post_init__(self):
        _check(self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe}")
        _check(0 <= self.seed < 2**32,
               f"--seed must be in [0, 2**32 - 1] (numpy and scikit-learn need that), got {self.seed}")
        _check(not (self.model.ridge_base and not self.train.freeze_backbone),
               "--ridge-base needs --freeze-backbone (the ridge is fitted once on the frozen backbone's features)")
        _check(not (self.model.ridge_base and not self.cache.enabled),
               "--ridge-base fits its ridge on the frozen-feature cache: drop --no-feature-cache")
        _check(not (self.post.apply_context_adjustment and not self.model.use_aux_heads),
               "--apply-context-adjustment needs --use-aux-heads "
               "(it uses the heads' State/Month/Species probabilities)")

    def init_seed(self, fold: int) -> int:
        """The seed of one fold's weight initialisation (the global torch / numpy / random state)."""
        return self.seed + fold

    def fold_seed(self, fold: int) -> int:
        """The seed of one fold's data pipeline: shuffling, augmentation and mixing."""
        return self.seed + 100 * fold

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (tuples become lists), the same in config.json and in checkpoints."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict, base: RunConfig | None = None) -> RunConfig:
        """Inverse of to_dict. What `d` does not hold takes `base`'s value (default: the dataclasses' defaults);
        unknown keys are ignored so older checkpoints keep loading."""
        base = base if base is not None else cls()
        parts = {}
        for f in dataclasses.fields(cls):
            value = getattr(base, f.name)
            given = d.get(f.name, value)
            if dataclasses.is_dataclass(value) and isinstance(given, dict):
                known = {g.name for g in dataclasses.fields(value)}
                given = dataclasses.replace(value, **{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in given.items() if k in known})
            parts[f.name] = given
        return cls(**parts)


def _plain(value):
    """Tuples to lists, recursively: what JSON would give back, so config.json and checkpoints agree."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
