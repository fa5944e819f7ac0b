"""Out-of-fold evaluation of a finished run: each training image is predicted by the model of the fold that
held it out, in grams, with the run's post-processing (and --derive-dead on top when asked).

    python -m src.eval_5head_oof --model-dir ./outputs/5head_20251214_123456
    python -m src.eval_5head_oof --model-dir ./outputs/5head_20251214_123456 --tta --derive-dead --device cuda

Options left out take the run's value (config.json): --backbone, --grid, --hidden-ratio must match the run
(a contradiction is an error), --img-size may differ (warning), --num-folds must agree with folds.csv, and
--data-dir defaults to the run's --base-path. Folds without a checkpoint (a run with --train-folds 0 2) are
skipped and reported. Single process only (inference of a few hundred images needs no torchrun).

Writes into --model-dir, atomically, overwriting an earlier evaluation (these are derived results; the options
that made them are in oof_metrics.json): oof_predictions.csv (one row per image), oof_metrics.json
(weighted_r2, weighted_r2_mean_per_target, per_target, per_fold, n_images, options, folds_evaluated,
folds_skipped) and oof_pred_vs_true.png. Exit code 2 with a one-line message for unusable runs or options.
"""
from __future__ import annotations

import argparse
import logging

from biomass5head.cli.common import RUN_VALUE, add_inference_arguments, prog, run_command

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The eval_5head_oof parser: the reference's options; `None` defaults mean 'take the run's value'."""
    p = argparse.ArgumentParser(prog=prog("python -m src.eval_5head_oof"), description=__doc__.splitlines()[0])
    _, inference = add_inference_arguments(
        p, model_dir_help="run folder with 5head_best_fold{k}.pth, folds.csv, config.json",
        data_dir_help="folder with train.csv and train/")
    inference.add_argument("--num-folds", type=int, default=None, help="must agree with folds.csv (default: its count)")
    g = p.add_argument_group("Model (must match training; left out: the run's value)")
    g.add_argument("--backbone", default=None, help=f"timm name; a different architecture is an error ({RUN_VALUE})")
    g.add_argument("--grid", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"), help=f"tile grid ({RUN_VALUE})")
    g.add_argument("--dropout", type=float, default=None, help="accepted for compatibility: no effect at inference")
    g.add_argument("--hidden-ratio", type=float, default=None, help=f"head hidden ratio ({RUN_VALUE})")
    g.add_argument("--img-size", type=int, default=None, help=f"tile size; may differ from training, with a "
                   f"warning ({RUN_VALUE}, else 518)")
    return p


def evaluate_command(args: argparse.Namespace) -> dict:
    from biomass5head.infer.oof import evaluate  # here, so that --help answers without loading torch

    return evaluate(args.model_dir, vars(args))


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, evaluate_command, logger)
