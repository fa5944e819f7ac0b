"""`python -m src.report` (`biomass5head report`): report.md puts the 5-head OOF scores beside a ridge probe on the
same frozen features (the ridge's score recomputed here from the cached features); runs it cannot describe are clear
errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from biomass5head.cli import eval as eval_cli
from biomass5head.cli import report as report_cli
from biomass5head.constants import TARGETS
from biomass5head.data.tables import load_train
from biomass5head.infer.linear_probe import ridge_oof
from biomass5head.infer.report import probe_features
from biomass5head.infer.run_folder import open_run
from biomass5head.metrics import compute_metrics


def copy_run(run, dest):
    """The run's small files copied and its checkpoints linked, so outputs land in a folder of this test's own."""
    dest.mkdir(parents=True)
    for path in run.iterdir():
        if path.suffix == ".pth":
            (dest / path.name).symlink_to(path)
        elif path.is_file() and not path.name.startswith(("oof_", "report", "ridge_")):
            shutil.copy(path, dest / path.name)
    return dest


@pytest.fixture(scope="module")
def reported(head_only, tmp_path_factory):
    """The head-only run (folds 0 and 1 trained) evaluated and reported."""
    run_dir = copy_run(head_only.out, tmp_path_factory.mktemp("report") / "run")
    assert eval_cli.main(["--model-dir", str(run_dir)]) == 0
    assert report_cli.main(["--model-dir", str(run_dir)]) == 0
    return run_dir


def test_report_sets_the_five_heads_beside_the_ridge_on_the_same_features(reported, tiny_data):
    text = (reported / "report.md").read_text()
    five_head = json.loads((reported / "oof_metrics.json").read_text())
    ridge = json.loads((reported / "ridge_oof_metrics.json").read_text())
    assert "| | 5-head model | ridge on frozen features |" in text
    assert f"**{five_head['weighted_r2']:.4f}**" in text and f"**{ridge['weighted_r2']:.4f}**" in text
    assert "![predicted vs true](oof_pred_vs_true.png)" in text and "Predicting the training mean scores" in text
    # the ridge's scores from its own definition: the same images and folds as the OOF table, test_vit's D = 64
    oof = pd.read_csv(reported / "oof_predictions.csv")
    assert ridge["n_images"] == five_head["n_images"] == len(oof)
    assert f"({2 * 1 * 2 * 64} numbers per photo)" in text  # 2 views x grid 1x2 x D
    df = load_train(tiny_data).set_index("sample_id_prefix").loc[oof["sample_id_prefix"]].reset_index()
    features = probe_features(open_run(reported), df)
    true = df[list(TARGETS)].to_numpy(np.float64)
    expected = compute_metrics(true, ridge_oof(features, true, oof["fold"].to_numpy()))
    assert ridge["weighted_r2"] == pytest.approx(expected["weighted_r2"], rel=1e-9)


def test_ridge_oof_is_out_of_fold_and_beats_the_mean_on_separable_features():
    rng = np.random.default_rng(0)
    targets = np.exp(rng.normal(3.0, 0.8, size=(60, 5)))
    features = np.concatenate([np.log1p(targets) + rng.normal(0, 0.05, (60, 5)), rng.normal(size=(60, 20))], 1)
    folds = np.arange(60) % 3
    pred = ridge_oof(features, targets, folds)
    assert pred.shape == (60, 5) and (pred >= 0).all()
    assert compute_metrics(targets, pred)["weighted_r2"] > 0.9
    # out of fold: changing one fold's targets leaves that fold's predictions unchanged
    other = targets.copy()
    other[folds == 0] *= 3
    np.testing.assert_allclose(ridge_oof(features, other, folds)[folds == 0], pred[folds == 0], rtol=1e-9)


def test_report_needs_an_evaluated_frozen_run(tiny_run, head_only, tmp_path, caplog):
    unevaluated = copy_run(head_only.out, tmp_path / "fresh")
    assert report_cli.main(["--model-dir", str(unevaluated)]) == 2
    assert "oof_metrics.json is missing: run `python -m src.eval_5head_oof" in caplog.text
    fine_tuned = copy_run(tiny_run, tmp_path / "fine_tuned")
    assert eval_cli.main(["--model-dir", str(fine_tuned)]) == 0
    assert report_cli.main(["--model-dir", str(fine_tuned)]) == 2
    assert "needs a run trained with --freeze-backbone" in caplog.text
    assert not (fine_tuned / "report.md").exists()
