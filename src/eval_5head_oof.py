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
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .cli import run_or_exit_code, setup_logging
from .constants import TARGETS
from .data import load_train
from .fileio import write_csv, write_json
from .folds import FoldError, read_fold_csv
from .inference import RunError, add_cache_arguments, open_run, predict_oof, resolve_options, runtime
from .metrics import compute_metrics, format_metrics_table
from .plots import plot_pred_vs_true

logger = logging.getLogger("src.eval_5head_oof")

META = ["sample_id_prefix", "fold", "image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI",
        "Height_Ave_cm"]
TRUE_COLS = [f"true_{t}" for t in TARGETS]
PRED_COLS = [f"pred_{t}" for t in TARGETS]
RUN_VALUE = "default: the run's value"


def build_parser() -> argparse.ArgumentParser:
    """The eval_5head_oof parser: the reference's options; `None` defaults mean 'take the run's value'."""
    p = argparse.ArgumentParser(prog="python -m src.eval_5head_oof", description=__doc__.splitlines()[0])
    g = p.add_argument_group("Paths")
    g.add_argument("--model-dir", required=True, help="run folder with 5head_best_fold{k}.pth, folds.csv, config.json")
    g.add_argument("--data-dir", default=None, help="folder with train.csv and train/ (default: the run's "
                   "--base-path, else ./data)")
    g = p.add_argument_group("Model (must match training; left out: the run's value)")
    g.add_argument("--backbone", default=None, help=f"timm name; a different architecture is an error ({RUN_VALUE})")
    g.add_argument("--grid", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"), help=f"tile grid ({RUN_VALUE})")
    g.add_argument("--dropout", type=float, default=None, help="accepted for compatibility: no effect at inference")
    g.add_argument("--hidden-ratio", type=float, default=None, help=f"head hidden ratio ({RUN_VALUE})")
    g.add_argument("--img-size", type=int, default=None, help=f"tile size; may differ from training, with a "
                   f"warning ({RUN_VALUE}, else 518)")
    g = p.add_argument_group("Inference")
    g.add_argument("--batch-size", type=int, default=None, help=f"images per batch ({RUN_VALUE}, else 4)")
    g.add_argument("--num-workers", type=int, default=None, help=f"DataLoader workers ({RUN_VALUE}, else 4)")
    g.add_argument("--num-folds", type=int, default=None, help="must agree with folds.csv (default: its count)")
    g.add_argument("--device", default=None, choices=("cuda", "mps", "cpu"), help="default: auto-detect")
    add_cache_arguments(g)
    g = p.add_argument_group("Evaluation")
    g.add_argument("--tta", action="store_true", help="average original, horizontal and vertical flips (in grams)")
    g.add_argument("--derive-dead", action="store_true", help="Dead = max(0, Total - GDM) after the run's "
                   "post-processing")
    return p


def read_run_folds(run, df: pd.DataFrame, num_folds: int | None) -> np.ndarray:
    """The run's fold of every row of `df`, from folds.csv, which must hold exactly df's images; --num-folds must
    agree with it and every checkpoint's fold must be one of its folds."""
    path = run.path / "folds.csv"
    if not path.is_file():
        raise RunError(f"{run.path} has no folds.csv: cannot tell which fold held out which image")
    try:
        present = sorted(pd.read_csv(path)["fold"].astype(int).unique().tolist())
    except (KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RunError(f"{path} cannot be read as sample_id_prefix,fold: {exc}") from exc
    if num_folds is not None and num_folds != len(present):
        raise RunError(f"--num-folds {num_folds} disagrees with {path}, which has {len(present)} folds {present}")
    strays = [k for k in run.checkpoints if k not in present]
    if strays:
        raise RunError(f"checkpoint(s) for fold(s) {strays} in {run.path}, but folds.csv has only folds {present}")
    try:
        return read_fold_csv(path, df, len(present))
    except FoldError as exc:
        raise RunError(f"the run's folds.csv and the training data do not hold the same images: {exc}") from exc


def oof_table(df: pd.DataFrame, folds: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    """oof_predictions.csv: metadata, then true_<target> and pred_<target> in grams."""
    out = df.assign(fold=folds)[META].reset_index(drop=True)
    out[TRUE_COLS] = df[list(TARGETS)].to_numpy(np.float64)
    out[PRED_COLS] = pred
    return out


def _metrics(true: np.ndarray, pred: np.ndarray) -> dict:
    """compute_metrics, or just the count where R2 is undefined (fewer than 2 images)."""
    if len(true) < 2:
        return {"weighted_r2": None, "n_images": int(len(true))}
    return compute_metrics(true, pred)


def oof_metrics(table: pd.DataFrame, evaluated: list[int], skipped: list[int], n_skipped: int, options: dict) -> dict:
    """oof_metrics.json from the predictions table alone: global and per-fold scores, coverage, options."""
    true, pred = table[TRUE_COLS].to_numpy(), table[PRED_COLS].to_numpy()
    metrics = _metrics(true, pred)
    folds = table["fold"].to_numpy()
    metrics["per_fold"] = {str(k): _metrics(true[folds == k], pred[folds == k]) for k in evaluated}
    scores = [m["weighted_r2"] for m in metrics["per_fold"].values() if m["weighted_r2"] is not None]
    metrics.update(mean_fold_weighted_r2=float(np.mean(scores)) if scores else None, folds_evaluated=evaluated,
                   folds_skipped=skipped, n_images_skipped=int(n_skipped), options=options)
    return metrics


def report(metrics: dict, run_dir: Path) -> str:
    """The printed summary: coverage, options, the metric table and per-fold primary scores."""
    o = metrics["options"]
    post = [f"correction threshold {o['correction_threshold']}"]
    post += ["always correct Dead"] * o["always_correct_dead"] + ["context adjustment"] * o["apply_context_adjustment"]
    post += ["derive-dead"] * o["derive_dead"]
    lines = [f"OOF evaluation of {run_dir}: folds {metrics['folds_evaluated']}, {metrics['n_images']} images"]
    if metrics["folds_skipped"]:
        lines.append(f"skipped folds {metrics['folds_skipped']} (no checkpoint): {metrics['n_images_skipped']} images")
    lines.append(f"TTA {'on' if o['tta'] else 'off'}; post-processing: {', '.join(post)}; img size {o['img_size']}")
    lines.append(format_metrics_table(metrics) if metrics["weighted_r2"] is not None else "too few images for R2")
    for fold, m in metrics["per_fold"].items():
        score = "n/a" if m["weighted_r2"] is None else f"{m['weighted_r2']:.4f}"
        lines.append(f"fold {fold}: weighted R2 {score} ({m['n_images']} images)")
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> dict:
    """Run the OOF evaluation of args.model_dir; writes its three files and returns the metrics."""
    run = open_run(args.model_dir)
    opts = resolve_options(run, vars(args))
    if not (Path(opts.data_dir) / "train.csv").is_file():
        raise RunError(f"no train.csv in {opts.data_dir} (the run's --base-path unless --data-dir is given)")
    df = load_train(opts.data_dir)
    folds = read_run_folds(run, df, args.num_folds)
    device, autocast, precision = runtime(opts)
    logger.info("evaluating %s: %d images, checkpoints of folds %s, device %s, %s", run.path, len(df),
                list(run.checkpoints), device, precision)
    pred, evaluated, skipped = predict_oof(run, df, folds, opts, device, autocast)
    keep = np.isin(folds, evaluated)
    table = oof_table(df[keep], folds[keep], pred[keep])
    options = {**opts.record(), "device": str(device), "autocast": precision}
    metrics = oof_metrics(table, evaluated, skipped, int((~keep).sum()), options)
    write_csv(run.path / "oof_predictions.csv", table)
    write_json(run.path / "oof_metrics.json", metrics)
    plot_pred_vs_true(table[TRUE_COLS].to_numpy(), table[PRED_COLS].to_numpy(), run.path / "oof_pred_vs_true.png",
                      title=f"OOF predictions, folds {evaluated}")
    print(report(metrics, run.path), flush=True)
    return metrics


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    # RunError, DataError, FoldError, ImageReadError and missing files are user errors
    return run_or_exit_code(lambda: evaluate(args), logger)


if __name__ == "__main__":
    sys.exit(main())
