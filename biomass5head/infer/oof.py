"""Out-of-fold evaluation of a finished run: every training image predicted by the model of the fold that held it
out, scored in grams, and written as oof_predictions.csv, oof_metrics.json and oof_pred_vs_true.png.
The command is `cli/eval.py` (`python -m src.eval_5head_oof`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from biomass5head.constants import TARGETS
from biomass5head.data.folds import FoldError, read_fold_csv
from biomass5head.data.tables import load_train
from biomass5head.fileio import write_csv, write_json
from biomass5head.infer.fold_model import predict_oof
from biomass5head.infer.linear_probe import comparison, probe_metrics
from biomass5head.infer.run_folder import RunError, check_run_photos, open_run, resolve_options, runtime
from biomass5head.metrics import compute_metrics, format_metrics_table
from biomass5head.plots import plot_pred_vs_true

logger = logging.getLogger(__name__)

META = ["sample_id_prefix", "fold", "image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI",
        "Height_Ave_cm"]
TRUE_COLS = [f"true_{t}" for t in TARGETS]
PRED_COLS = [f"pred_{t}" for t in TARGETS]


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


def selection_note(select_on: str, refit: bool = False) -> str:
    """How a run chose its epochs, in words for eval's log, oof_metrics.json and report.md."""
    if select_on == "inner":
        note = "inner (early stopping and the best epoch chosen on an inner split of the training folds: honest OOF)"
        return note + (", then each fold refitted on all its training images up to that epoch (--refit)" if refit
                       else "")
    return ("fold (early stopping and the best epoch chosen on the fold that is then scored, as in the reference: "
            "this OOF score is optimistic; train with --select-on inner for an honest one)")


def format_report(metrics: dict, run_dir: Path) -> str:
    """The printed summary: coverage, options, the metric table and per-fold primary scores."""
    o = metrics["options"]
    post = ["context adjustment"] * o["apply_context_adjustment"] + ["reconcile"] * o.get("reconcile", False)
    post += [f"correction threshold {o['correction_threshold']}"] + ["always correct Dead"] * o["always_correct_dead"]
    post += ["derive-dead"] * o["derive_dead"]  # (in the order they apply)
    lines = [f"OOF evaluation of {run_dir}: folds {metrics['folds_evaluated']}, {metrics['n_images']} images"]
    if metrics["folds_skipped"]:
        lines.append(f"skipped folds {metrics['folds_skipped']} (no checkpoint): {metrics['n_images_skipped']} images")
    lines.append(f"TTA {'on' if o['tta'] else 'off'}; post-processing: {', '.join(post)}; img size {o['img_size']}")
    if "selection" in metrics:
        lines.append(f"epoch selection: {metrics['selection']}")
    lines.append(format_metrics_table(metrics) if metrics["weighted_r2"] is not None else "too few images for R2")
    for fold, m in metrics["per_fold"].items():
        score = "n/a" if m["weighted_r2"] is None else f"{m['weighted_r2']:.4f}"
        lines.append(f"fold {fold}: weighted R2 {score} ({m['n_images']} images)")
    return "\n".join(lines)


def compare_with_probe(run, df: pd.DataFrame, folds: np.ndarray, table: pd.DataFrame, metrics: dict) -> None:
    """For a frozen-backbone run: the ridge probe's OOF score on the same features, folds and images
    (`linear_probe.py`) goes into `metrics` (`ridge_probe_weighted_r2`) and the log, with a warning when the
    5-head model loses to it."""
    if not run.config.train.freeze_backbone or metrics["weighted_r2"] is None:
        return
    try:
        ridge = probe_metrics(run, df, folds, table["sample_id_prefix"])["weighted_r2"]
    except RunError as exc:
        logger.info("ridge probe skipped: %s", exc)
        return
    metrics["ridge_probe_weighted_r2"] = ridge
    text = comparison(metrics["weighted_r2"], ridge, run.config.recipe).replace("**", "").replace("²", "2")
    (logger.info if metrics["weighted_r2"] >= ridge else logger.warning)(
        "ridge probe on the same features and folds: weighted R2 %.4f. %s", ridge, text)


def evaluate(model_dir: str | Path, given: dict) -> dict:
    """The OOF evaluation of a run folder with the command line's options (`given`, None = the run's value);
    writes its three files, prints the summary and returns the metrics."""
    run = open_run(model_dir)
    opts = resolve_options(run, given)
    if not (Path(opts.data_dir) / "train.csv").is_file():
        raise RunError(f"no train.csv in {opts.data_dir} (the run's --base-path unless --data-dir is given)")
    df = load_train(opts.data_dir)
    check_run_photos(opts, df["abs_path"], "training photos")
    folds = read_run_folds(run, df, given.get("num_folds"))
    rt = runtime(opts)
    logger.info("evaluating %s: %d images, checkpoints of folds %s, device %s, %s", run.path, len(df),
                list(run.checkpoints), rt.device, rt.dtype_name)
    pred, evaluated, skipped = predict_oof(run, df, folds, opts, rt)
    keep = np.isin(folds, evaluated)
    table = oof_table(df[keep], folds[keep], pred[keep])
    options = {**opts.record(), "device": str(rt.device), "autocast": rt.dtype_name}
    metrics = oof_metrics(table, evaluated, skipped, int((~keep).sum()), options)
    metrics["selection"] = selection_note(run.config.train.select_on, run.config.train.refit)
    if opts.feature_cache is not None:  # (with --no-feature-cache the user asked eval not to use it)
        compare_with_probe(run, df, folds, table, metrics)
    write_csv(run.path / "oof_predictions.csv", table)
    write_json(run.path / "oof_metrics.json", metrics)
    plot_pred_vs_true(table[TRUE_COLS].to_numpy(), table[PRED_COLS].to_numpy(), run.path / "oof_pred_vs_true.png",
                      title=f"OOF predictions, folds {evaluated}")
    print(format_report(metrics, run.path), flush=True)
    return metrics
