"""`python -m src.report` (`biomass5head report`): report.md puts the 5-head OOF scores beside a ridge probe on the
same frozen features (the ridge's score recomputed here from the cached features); runs it cannot describe are clear
errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from biomass5head.cli import eval as eval_cli
from biomass5head.cli import report as report_cli
from biomass5head.constants import TARGETS
from biomass5head.data.folds import inner_parts, inner_split, read_fold_csv
from biomass5head.data.tables import load_train
from biomass5head.infer.linear_probe import (
    ALPHAS,
    choose_alpha,
    pooled_features,
    probe_features,
    ridge_oof,
    ridge_path,
)
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


def probe_inputs(run_dir, data):
    """What the probe sees, read back independently: (run, training table, folds, its two poolings of the cached tile
    features (test_vit's D = 64), the two target spaces (forward, back), the grams)."""
    run = open_run(run_dir)
    df = load_train(data)
    folds = read_fold_csv(run_dir / "folds.csv", df, run.config.data.num_folds)
    tiles = probe_features(run, df).reshape(len(df), -1, 64)
    pooled = {"mean": tiles.mean(1), "mean_max": np.concatenate([tiles.mean(1), tiles.max(1)], 1)}
    spaces = {"log1p": (np.log1p, np.expm1), "sqrt": (np.sqrt, lambda z: np.maximum(z, 0) ** 2)}
    return run, df, folds, pooled, spaces, df[list(TARGETS)].to_numpy(np.float64)


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
    assert "| | 5-head model | ridge probe |" in text
    assert f"**{five_head['weighted_r2']:.4f}**" in text and f"**{ridge['weighted_r2']:.4f}**" in text
    assert "![predicted vs true](oof_pred_vs_true.png)" in text and "Predicting the training mean scores" in text
    # the head-only run selected its epochs on the scored fold (the reference's default), and the report says so
    assert "5-head selection: fold (early stopping and the best epoch chosen on the fold that is then scored" in text
    assert five_head["selection"].startswith("fold (")
    verdict = "beats the ridge probe by" if five_head["weighted_r2"] >= ridge["weighted_r2"] else "loses to the ridge"
    assert verdict in text
    # the ridge's scores from its own definition: the mean, or the mean and the max, over the tiles of both views
    # (test_vit's D = 64), log1p or sqrt grams, pooling, space and alpha chosen per fold on the inner split of the
    # training folds that --select-on inner uses, refitted on all the training images, scored on the OOF images
    oof = pd.read_csv(reported / "oof_predictions.csv")
    assert ridge["n_images"] == five_head["n_images"] == len(oof)
    assert "(the mean, 64 numbers per photo, or the mean and the max, 128; standardised)" in text
    run, df, folds, pooled, spaces, true = probe_inputs(reported, tiny_data)
    pred = np.zeros_like(true)
    for k in np.unique(folds):
        train = folds != k
        held = inner_split(df[train], run.config.data.cv_strategy, 0.2, run.config.fold_seed(int(k)))
        scores = {}
        for name, x in pooled.items():
            for space, (forward, back) in spaces.items():
                for alpha in ALPHAS:
                    scaler = StandardScaler().fit(x[train][~held])
                    fit = Ridge(alpha=alpha).fit(scaler.transform(x[train][~held]), forward(true[train][~held]))
                    guess = np.clip(back(fit.predict(scaler.transform(x[train][held]))), 0, None)
                    scores[name, space, alpha] = compute_metrics(true[train][held], guess)["weighted_r2"]
        name, space, alpha = max(scores, key=scores.get)
        if str(k) in ridge["chosen_per_fold"]:
            assert ridge["chosen_per_fold"][str(k)] == {"pooling": name, "space": space, "alpha": alpha}
        scaler = StandardScaler().fit(pooled[name][train])
        fit = Ridge(alpha=alpha).fit(scaler.transform(pooled[name][train]), spaces[space][0](true[train]))
        pred[folds == k] = np.clip(spaces[space][1](fit.predict(scaler.transform(pooled[name][folds == k]))), 0, None)
    rows = df.reset_index().set_index("sample_id_prefix").loc[oof["sample_id_prefix"], "index"].to_numpy()
    expected = compute_metrics(true[rows], pred[rows])
    # scikit-learn solves each ridge by Cholesky, the probe all alphas from one SVD: on 24 images and 64-128
    # features (a nearly interpolating ridge) the two agree to about 1e-5; test_ridge_path_is_scikit_learns_ridge
    # pins the solver itself to 1e-10 on a well-posed problem
    assert ridge["weighted_r2"] == pytest.approx(expected["weighted_r2"], rel=1e-4)
    # eval already compared the two (log and oof_metrics.json) on the same images
    assert five_head["ridge_probe_weighted_r2"] == pytest.approx(ridge["weighted_r2"], rel=1e-9)


def test_ridge_oof_is_out_of_fold_and_beats_the_mean_on_separable_features():
    rng = np.random.default_rng(0)
    targets = np.exp(rng.normal(3.0, 0.8, size=(60, 5)))
    features = np.concatenate([np.log1p(targets) + rng.normal(0, 0.05, (60, 5)), rng.normal(size=(60, 20))], 1)
    features = np.repeat(features[:, None, None, :], 2, axis=1)  # (N, 2 views, 1 tile, D)
    folds = np.arange(60) % 3
    inner = {k: np.arange(40) % 5 == 0 for k in range(3)}
    pred, chosen = ridge_oof(features, targets, folds, inner)
    assert pred.shape == (60, 5) and (pred >= 0).all() and set(chosen) == {0, 1, 2}
    assert compute_metrics(targets, pred)["weighted_r2"] > 0.9
    # out of fold, alpha included: changing one fold's targets leaves that fold's predictions unchanged
    other = targets.copy()
    other[folds == 0] *= 3
    again, again_chosen = ridge_oof(features, other, folds, inner)
    np.testing.assert_allclose(again[folds == 0], pred[folds == 0], rtol=1e-9)
    assert again_chosen[0] == chosen[0]


def test_ridge_path_is_scikit_learns_ridge():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 30)) * rng.uniform(0.1, 5, 30) + 3
    x[:, 7] = 0.25  # a constant feature is left unscaled, as StandardScaler does
    targets, x_new = rng.normal(size=(120, 5)), rng.normal(size=(15, 30))
    path = ridge_path(x, targets, x_new, ALPHAS)
    scaler = StandardScaler().fit(x)
    for alpha, pred in zip(ALPHAS, path, strict=True):
        expected = Ridge(alpha=alpha).fit(scaler.transform(x), targets).predict(scaler.transform(x_new))
        np.testing.assert_allclose(pred, expected, rtol=1e-10, atol=1e-10)


def test_alpha_is_chosen_on_the_held_out_rows_only():
    rng = np.random.default_rng(1)
    targets = np.exp(rng.normal(3.0, 0.8, size=(80, 5)))
    held = np.arange(80) % 4 == 0
    clean = np.log1p(targets) + rng.normal(0, 0.01, (80, 5))
    assert choose_alpha(clean, targets, held) == ALPHAS[0]  # exact features: the least shrinkage wins
    noise = rng.normal(size=(80, 40))
    assert choose_alpha(noise, targets, held) >= 100 * ALPHAS[0]  # pure noise: shrink hard towards the mean


def test_pooled_features_are_the_mean_and_max_over_all_tiles():
    tiles = np.arange(2 * 2 * 3 * 4, dtype=np.float64).reshape(2, 2, 3, 4)  # N=2, views, T=3, D=4
    pooled = pooled_features(tiles)
    np.testing.assert_array_equal(pooled[:, :4], tiles.reshape(2, 6, 4).mean(1))
    np.testing.assert_array_equal(pooled[:, 4:], tiles.reshape(2, 6, 4).max(1))
    np.testing.assert_array_equal(pooled_features(tiles, "mean"), tiles.reshape(2, 6, 4).mean(1))


@pytest.mark.slow  # a few seconds; moved out of README command 2's budget
def test_report_needs_an_evaluated_frozen_run(tiny_run, head_only, tmp_path, caplog):
    unevaluated = copy_run(head_only.out, tmp_path / "fresh")
    assert report_cli.main(["--model-dir", str(unevaluated)]) == 2
    assert "oof_metrics.json is missing: run `python -m src.eval_5head_oof" in caplog.text
    fine_tuned = copy_run(tiny_run, tmp_path / "fine_tuned")
    assert eval_cli.main(["--model-dir", str(fine_tuned)]) == 0
    assert report_cli.main(["--model-dir", str(fine_tuned)]) == 2
    assert "needs a run trained with --freeze-backbone" in caplog.text
    assert not (fine_tuned / "report.md").exists()


def test_eval_says_when_the_five_heads_lose_to_the_probe(head_only, tmp_path, caplog, monkeypatch):
    import biomass5head.infer.linear_probe

    run_dir = copy_run(head_only.out, tmp_path / "run")
    # a probe that predicts every photo exactly: no model can beat it
    monkeypatch.setattr(biomass5head.infer.linear_probe, "probe_oof",
                        lambda run, df, folds: (df[list(TARGETS)].to_numpy(np.float64), {}, 64))
    assert eval_cli.main(["--model-dir", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "oof_metrics.json").read_text())
    assert metrics["ridge_probe_weighted_r2"] == 1.0
    warned = [r for r in caplog.records if "loses to the ridge probe by" in r.getMessage()]
    assert warned and warned[0].levelname == "WARNING"
    assert f"loses to the ridge probe by {1.0 - metrics['weighted_r2']:.4f}" in warned[0].getMessage()


def test_after_ridge_select_cv_the_probe_is_chosen_by_the_same_inner_cross_validation(head_only, tiny_data,
                                                                                      tmp_path):
    """A run whose ridge base chose by --ridge-select cv is compared with a probe chosen by the same rule: the
    pooling, space and alpha with the best mean weighted R2 over the inner parts of each fold's training images."""
    run_dir = copy_run(head_only.out, tmp_path / "cv")
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["ridge_select"] = "cv"
    (run_dir / "config.json").write_text(json.dumps(config))
    assert eval_cli.main(["--model-dir", str(run_dir)]) == 0
    assert report_cli.main(["--model-dir", str(run_dir)]) == 0
    ridge = json.loads((run_dir / "ridge_oof_metrics.json").read_text())
    assert ridge["chosen_on"] == "inner cross-validation"
    assert "chosen on a cross-validation over the inner parts" in (run_dir / "report.md").read_text()
    run, df, folds, pooled, spaces, true = probe_inputs(run_dir, tiny_data)
    for k in map(int, np.unique(folds)):
        train = folds != k
        parts = inner_parts(df[train], run.config.data.cv_strategy, 0.2, run.config.fold_seed(k))
        assert parts.max() >= 1
        scores = {}
        for name, x in pooled.items():
            for space, (forward, back) in spaces.items():
                for alpha in ALPHAS:
                    per_part = []
                    for j in range(parts.max() + 1):
                        fit_x, held_x = x[train][parts != j], x[train][parts == j]
                        scaler = StandardScaler().fit(fit_x)
                        fit = Ridge(alpha=alpha).fit(scaler.transform(fit_x), forward(true[train][parts != j]))
                        guess = np.clip(back(fit.predict(scaler.transform(held_x))), 0, None)
                        per_part.append(compute_metrics(true[train][parts == j], guess)["weighted_r2"])
                    scores[name, space, alpha] = np.mean(per_part)
        name, space, alpha = max(scores, key=scores.get)
        assert ridge["chosen_per_fold"][str(k)] == {"pooling": name, "space": space, "alpha": alpha}


def test_the_verdict_suggests_the_robust_recipe_only_to_runs_without_it():
    from biomass5head.infer.linear_probe import comparison

    assert comparison(0.85, 0.80) == "The 5-head model beats the ridge probe by 0.0500 weighted R²."
    reference = comparison(0.80, 0.85)
    assert reference.startswith("**The 5-head model loses to the ridge probe by 0.0500 weighted R²**")
    assert "try `--recipe robust`" in reference
    robust = comparison(0.80, 0.85, "robust")
    assert "loses to the ridge probe by 0.0500" in robust and "try `--recipe robust`" not in robust
    assert "even with `--recipe robust`" in robust
