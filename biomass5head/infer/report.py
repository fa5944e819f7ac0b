"""A short report of a finished, evaluated run (report.md): the OOF metric table of the 5-head model beside a ridge
regression on the same frozen features, with links to the plots and the submission. The command is `cli/report.py`
(`python -m src.report`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from biomass5head.constants import TARGET_SHORT, TARGETS
from biomass5head.data.folds import read_fold_csv
from biomass5head.data.tables import load_train
from biomass5head.fileio import atomic_path, write_json
from biomass5head.infer.linear_probe import comparison, probe_metrics
from biomass5head.infer.oof import selection_note
from biomass5head.infer.run_folder import RunError, open_run, resolve_options


def metric_rows(named: dict) -> str:
    """Markdown table: one column per model, rows = per-target R2 then the two weighted scores."""
    names = list(named)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for target, short in zip(TARGETS, TARGET_SHORT, strict=True):
        scores = " | ".join(f"{named[n]['per_target'][target]['r2']:.4f}" for n in names)
        lines.append(f"| R² {short} | {scores} |")
    lines.append("| **weighted R² (global, primary)** | "
                 + " | ".join(f"**{named[n]['weighted_r2']:.4f}**" for n in names) + " |")
    lines.append("| weighted mean of per-target R² | "
                 + " | ".join(f"{named[n]['weighted_r2_mean_per_target']:.4f}" for n in names) + " |")
    return "\n".join(lines)


def build_report(run_dir: Path) -> str:
    """Compute the ridge OOF scores on the run's folds and write report.md; returns its text."""
    run = open_run(run_dir)
    metrics_path = run.path / "oof_metrics.json"
    if not metrics_path.is_file():
        raise RunError(f"{metrics_path} is missing: run `python -m src.eval_5head_oof --model-dir {run.path}` first")
    five_head = json.loads(metrics_path.read_text())
    oof = pd.read_csv(run.path / "oof_predictions.csv")
    df = load_train(resolve_options(run, {}).data_dir)
    folds = read_fold_csv(run.path / "folds.csv", df, run.config.data.num_folds)
    ridge = probe_metrics(run, df, folds, oof["sample_id_prefix"])
    dim = ridge["feature_dim"]
    per_fold = ", ".join("{pooling} {space} {alpha:g}".format(**c) for c in ridge["chosen_per_fold"].values())
    write_json(run.path / "ridge_oof_metrics.json", ridge)
    baseline = json.loads((run.path / "summary.json").read_text()).get("mean_baseline_train_mean_r2")
    selection = five_head.get("selection", selection_note(run.config.train.select_on, run.config.train.refit))
    verdict = comparison(five_head["weighted_r2"], ridge["weighted_r2"], run.config.recipe)
    text = "\n".join([
        f"# Report: {run.path.name}", "",
        f"Out-of-fold scores on {five_head['n_images']} images (folds {five_head['folds_evaluated']}), in grams. "
        f"5-head selection: {selection}.", "",
        "Ridge probe: one ridge regression of log1p(grams) or sqrt(grams) on the same frozen tile features, pooled "
        f"over the tiles of both views (the mean, {dim} numbers per photo, or the mean and the max, {2 * dim}; "
        "standardised), same folds; the pooling, target space and alpha are chosen on "
        + ("a cross-validation over the inner parts of each fold's training images (the run's --ridge-select cv)"
           if ridge["chosen_on"] == "inner cross-validation" else "an inner split of each fold's training images")
        + f", never on the scored fold (per fold: {per_fold}).", "",
        metric_rows({"5-head model": five_head, "ridge probe": ridge}), "",
        verdict, "",
        f"Predicting the training mean scores {baseline:.4f} (mean over folds)." if baseline is not None else "",
        "", "![predicted vs true](oof_pred_vs_true.png)", "", "![learning curves](learning_curves.png)", "",
        "Submission: `submission.csv`" if (run.path / "submission.csv").is_file() else "", ""])
    with atomic_path(run.path / "report.md") as tmp:
        tmp.write_text(text)
    return text
