"""The options of `python -m src.train_5head`: the parser, grouped and ordered as in the reference, and `--recipe`,
which fills in a bundle of defaults for the options the command line did not give (`cli/train.py` runs them)."""
from __future__ import annotations

import argparse
import copy
import logging

from biomass5head.cli.common import prog
from biomass5head.config import (
    AMP_DTYPES,
    DEFAULT_BACKBONE,
    RECIPES,
    RIDGE_SELECT,
    SCALE_PADS,
    SELECT_ON,
    TARGET_TRANSFORMS,
    TILE_FEATURES,
)
from biomass5head.constants import CV_STRATEGIES
from biomass5head.recipes import RECIPE_DEFAULTS, RECIPE_YIELDS, applies
from biomass5head.recipes import describe as describe_recipe

logger = logging.getLogger(__name__)
# What may be given with --resume: where the data now is, and how the run executes. The run's results repeat exactly
# with the recorded device and workers (the default); another --device-type or --num-workers gives a valid run whose
# numbers differ slightly (other kernels; augmentation is seeded per DataLoader worker).
RESUME_OPTIONS = ("--base-path", "--num-workers", "--device-type", "--save-every", "--keep-last")
RESUME_DESTS = tuple(o[2:].replace("-", "_") for o in RESUME_OPTIONS)


class RecipeParser(argparse.ArgumentParser):
    """An ArgumentParser that also records which options the command line gave (`args._given`), so that a
    `--recipe` fills in only the others."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        probe = copy.deepcopy(self)
        probe.__class__ = argparse.ArgumentParser
        for action in probe._actions:
            action.default, action.required = argparse.SUPPRESS, False
        given, _ = probe.parse_known_args(args)
        ns._given = frozenset(vars(given))
        return ns, rest


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace with the --recipe's values for every option the command line did not give."""
    given = getattr(args, "_given", frozenset())
    values = {k: v for k, v in RECIPE_DEFAULTS[args.recipe].items()
              if k not in given and not given & set(RECIPE_YIELDS.get(k, ()))}
    values = {k: v for k, v in values.items() if applies(k, {**vars(args), **values})}
    if values:
        logger.info("--recipe %s: %s", args.recipe, ", ".join(f"{k} {v}" for k, v in values.items()))
    return argparse.Namespace(**{**vars(args), **values})


def build_parser() -> argparse.ArgumentParser:
    """The train_5head parser, grouped and ordered as in the reference."""
    p = RecipeParser(prog=prog("python -m src.train_5head"),
                                description="Train the 5-head DINOv2 biomass model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Paths")
    g.add_argument("--base-path", default="./data", help="directory with train.csv and train/")
    g.add_argument("--output-dir", default=None, help="run folder (default ./outputs/5head_YYYYMMDD_HHMMSS/)")

    g.add_argument("--check-photos", default="header", choices=("header", "full"),
                   help="before training, read every photo's header (size, mode), or decode it in full")
    g.add_argument("--allow-any-aspect", action="store_true",
                   help="accept photos that are not 2:1 stereo pairs (split at the middle column, with a warning)")

    g = p.add_argument_group("Model architecture")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm ViT name")
    g.add_argument("--grid", type=int, nargs=2, default=[2, 2], metavar=("ROWS", "COLS"), help="tile grid per view")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout in the heads (0.0-0.5)")
    g.add_argument("--hidden-ratio", type=float, default=0.5, help="hidden = 2 x D x ratio")
    g.add_argument("--no-film", action="store_true", help="disable FiLM conditioning between views")
    g.add_argument("--no-attention-pool", action="store_true", help="mean pooling over tiles instead of attention")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the backbone")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone for the epochs that train or run it on pixels (a GPU option: "
                        "the first steps wait for compilation; on a CPU it needs a C++ compiler)")
    g.add_argument("--backbone-weights", default=None, metavar="FILE",
                   help="local .safetensors/.pth backbone weights (timm or original DINOv2 layout)")
    g.add_argument("--no-pretrained", action="store_true", help="random backbone initialisation")
    g.add_argument("--tile-feature", default="cls", choices=TILE_FEATURES,
                   help="what each tile gives FiLM and pooling: the CLS token (default, the reference), the mean of "
                        "its patch tokens, or both concatenated (twice the feature size)")
    g.add_argument("--interval-heads", type=int, default=0, metavar="K",
                   help="auxiliary heads classify each target into up to K (2-50) quantile bins of the training "
                        "fold; a zero-inflated target gets a bin of its own for the value 0, tied edges merge "
                        "(default 0: off)")
    g.add_argument("--interval-weight", type=float, default=0.3, metavar="W",
                   help="weight of the interval heads' cross-entropy beside the regression loss (default 0.3)")
    g.add_argument("--head-seeds", type=int, default=1, metavar="K", help="K copies of the heads, each initialised "
                   "from its own random draw and trained on its own loss; the prediction is their mean (default 1)")
    g.add_argument("--ridge-base", action="store_true",
                   help="with --freeze-backbone: the heads learn a residual over a ridge regression on the training "
                        "images' mean tile features (alpha chosen as --ridge-select says), starting from zero")
    g.add_argument("--ridge-select", default="holdout", choices=RIDGE_SELECT,
                   help="with --ridge-base, how its rows (originals, or with the feature bank) and alpha are chosen: "
                        "holdout = on the selection images (the scored fold, or the inner split with --select-on "
                        "inner), cv = by cross-validation over the k = round(1 / --inner-frac) inner parts of the "
                        "training folds, the mean of the parts' weighted R2 (never the scored fold)")

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
    g.add_argument("--reconcile", action="store_true",
                   help="make the five outputs consistent: Green, Dead and Clover fitted by least squares, under the "
                        "competition's weights, to all five predictions, then GDM and Total their sums (before the "
                        "Dead correction, which then changes nothing)")

    g = p.add_argument_group("Augmentation")
    g.add_argument("--img-size", type=int, default=518, help="tile size fed to the backbone")
    g.add_argument("--aug-prob", type=float, default=0.5)
    g.add_argument("--stereo-correct-aug", action="store_true", help="photometric transforms independent per view")
    g.add_argument("--stereo-swap-prob", type=float, default=0.0)
    g.add_argument("--scale-aug-prob", type=float, default=0.0, metavar="P",
                   help="probability of a random zoom, the same on both views (camera distance): out pads the view "
                        "(--scale-pad), in crops its edges; works with the feature bank; default 0: off")
    g.add_argument("--scale-range", type=float, nargs=2, default=[0.75, 1.25], metavar=("LOW", "HIGH"),
                   help="zoom factors (below 1: out, above 1: in; default 0.75 1.25)")
    g.add_argument("--scale-pad", default="reflect", choices=SCALE_PADS,
                   help="border of a zoom-out: the photo's edge mirrored (default) or neutral grey")
    g.add_argument("--light-aug-prob", type=float, default=0.0, metavar="P",
                   help="probability of a cast shadow, and separately of a daylight white balance (3000-15000 K), "
                        "the same on both views; works with the feature bank; default 0: off")

    g = p.add_argument_group("Target normalization")
    g.add_argument("--use-log-target", action="store_true", help="learn log1p(grams)")
    g.add_argument("--target-transform", default=None, choices=TARGET_TRANSFORMS,
                   help="space the heads learn in, before the per-target scale: identity, log1p (= --use-log-target) "
                        "or sqrt (default: log1p with --use-log-target, else identity)")

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
    g.add_argument("--select-on", default="fold", choices=SELECT_ON,
                   help="where early stopping and the best epoch are chosen: fold = on the fold that is then scored "
                        "(the reference; its OOF score is optimistic), inner = on an inner split of the training "
                        "folds, grouped like --cv-strategy (an honest OOF score)")
    g.add_argument("--inner-frac", type=float, default=0.2,
                   help="share of each fold's training images held out for --select-on inner")
    g.add_argument("--refit", action="store_true",
                   help="with --select-on inner: train each fold again on all its training images, to the epoch chosen")
    g.add_argument("--ema-decay", type=float, default=0.0, metavar="D",
                   help="validate and save an exponential moving average of the weights, updated every optimizer "
                        "step with decay D (e.g. 0.99; default 0: off, the reference)")

    g = p.add_argument_group("Device & misc")
    g.add_argument("--device-type", default=None, choices=("cuda", "mps", "cpu"), help="default: auto-detect")
    g.add_argument("--seed", type=int, default=18)
    g.add_argument("--recipe", default="reference", choices=RECIPES,
                   help="reference: the specification's defaults; robust: the small-data recipe for frozen-feature "
                        "training (README, \"Recipes\"): " + describe_recipe("robust") +
                        "; options given explicitly still win")

    g = p.add_argument_group("Stopping and resuming")
    g.add_argument("--resume", default=None, metavar="RUN", help="continue the stopped run in RUN with its own "
                   f"config.json (other options: only {', '.join(RESUME_OPTIONS)})")
    g.add_argument("--save-every", type=float, default=300.0, metavar="SECONDS",
                   help="write the resume state at the end of an epoch when this long has passed since the last "
                        "write (it is always written when a run stops); 0: every epoch")
    g.add_argument("--keep-last", action="store_true", help="keep 5head_last_fold{k}.pth after its fold ends")
    return p
