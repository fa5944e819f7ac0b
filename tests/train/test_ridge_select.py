"""`--ridge-select cv` (in `--recipe robust`; train/ridge_fit.py): the ridge base's rows and alpha are chosen by
cross-validation over the inner parts of the fold's training folds (`data.folds.inner_parts`), the mean of the parts'
weighted R^2, as scikit-learn's GridSearchCV scores; the scored fold never takes part. Both passes of a refitted
fold make the same choice; each fits the ridge on its own training images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from spied_run import N_TRAIN_FOLD0, train
from test_ridge_fit import nuisance_problem

from biomass5head.constants import TARGETS
from biomass5head.data.feature_cache import FeatureCache, ensure_features
from biomass5head.data.folds import inner_parts, make_folds
from biomass5head.data.tables import load_train
from biomass5head.metrics import compute_metrics
from biomass5head.model.ridge_base import ALPHAS, MIN_TARGET
from biomass5head.model.targets import TargetTransform
from biomass5head.train.ridge_fit import choose_rows_cv

BANK = 2


def sklearn_cv(x: dict, grams: np.ndarray, parts: np.ndarray, tf: TargetTransform, scored=None):
    """(rows, alpha, mean score) of the best scikit-learn ridge: for each candidate's mean features (R, D) (the N
    originals, then their copies) and alpha, a ridge fitted on the rows of the images outside part j, scored on part
    j's originals; the mean over parts; ties keep the earlier candidate and alpha."""
    best = None
    for rows, xr in x.items():
        copies = len(xr) // len(parts)
        row_part, t = np.tile(parts, copies), tf.encode(np.tile(grams, (copies, 1)))
        for alpha in ALPHAS:
            scores = []
            for j in np.unique(parts) if scored is None else scored:
                scaler = StandardScaler().fit(xr[row_part != j])
                ridge = Ridge(alpha=alpha).fit(scaler.transform(xr[row_part != j]), t[row_part != j])
                pred = tf.decode(np.maximum(ridge.predict(scaler.transform(xr[:len(parts)][parts == j])), MIN_TARGET))
                scores.append(compute_metrics(grams[parts == j], pred)["weighted_r2"])
            if best is None or np.mean(scores) > best[2] + 1e-9:
                best = (rows, float(alpha), float(np.mean(scores)))
    return best


def test_choose_rows_cv_is_the_mean_over_the_parts_of_sklearns_ridges():
    x, grams, dirs = nuisance_problem(n=60)
    rng = np.random.default_rng(3)
    bank = [x + (3.0 * rng.normal(size=(60, 4)) @ dirs)[:, None, None].astype(np.float32) for _ in range(3)]
    parts = np.arange(60) % 4
    rng.shuffle(parts)
    tf = TargetTransform.fit(grams, kind="sqrt")
    candidates = {"originals": (x, grams), "originals+bank": (np.concatenate([x, *bank]), np.tile(grams, (4, 1)))}
    rows, alpha, score = choose_rows_cv(candidates, parts, tf)
    means = {k: v[0].mean(axis=(1, 2)).astype(np.float64) for k, v in candidates.items()}
    want = sklearn_cv(means, grams, parts, tf)
    assert (rows, alpha) == want[:2] and score == pytest.approx(want[2], abs=1e-6)
    # the same candidate twice: a tie keeps the first
    assert choose_rows_cv({"first": (x, grams), "second": (x, grams)}, parts, tf)[0] == "first"


def test_a_part_is_never_scored_by_a_ridge_that_saw_its_images_or_their_variants():
    """Variants that are exact copies of the originals, in more dimensions than images: a ridge that had a held
    image's copy among its rows would nearly interpolate it and score about 1 at the smallest alpha."""
    x, grams, _ = nuisance_problem(n=40, d=80)
    tf = TargetTransform.fit(grams, kind="sqrt")
    parts = np.arange(40) % 4
    rows, alpha, score = choose_rows_cv({"originals+copies": (np.concatenate([x, x]), np.tile(grams, (2, 1)))},
                                        parts, tf)
    honest = sklearn_cv({"originals+copies": np.concatenate([x, x]).mean(axis=(1, 2)).astype(np.float64)},
                        grams, parts, tf)
    assert (rows, alpha) == honest[:2] and score == pytest.approx(honest[2], abs=1e-6)
    assert score < 0.9


@pytest.fixture(scope="module")
def cv_run(tiny_data, tmp_path_factory):
    return train(tmp_path_factory, tiny_data, "--select-on", "inner", "--inner-frac", "0.25", "--freeze-backbone",
                 "--ridge-base", "--target-transform", "sqrt", "--aug-prob", "0.5", "--feature-bank", str(BANK),
                 "--refit", "--ridge-select", "cv", "--epochs", "1")


def test_both_passes_choose_by_inner_cv_over_the_training_folds_only(cv_run, tiny_data):
    assert cv_run.rc == 0
    selection, refit = cv_run.trainers
    df = load_train(tiny_data)
    folds = make_folds(df, "group_month", 5, 18)
    pool = df[folds != 0]
    assert set(selection.train_folds_df["sample_id_prefix"]) == set(pool["sample_id_prefix"])
    assert set(refit.train_folds_df["sample_id_prefix"]) == set(pool["sample_id_prefix"])
    # the features as the cache holds them, read back independently of the trainer's tables
    root, key, common = selection._feature_cache()
    paths = list(map(str, pool["abs_path"]))
    originals = ensure_features(FeatureCache(root, **key), selection.model, paths, ["id"], **common)
    bank = ensure_features(FeatureCache(root, **key, aug_key=selection.feature_plan.aug_key), selection.model, paths,
                           [f"aug{k}" for k in range(BANK)], **common)
    means = [np.stack([originals[p]["id"] for p in paths]).mean(axis=(1, 2))]
    means += [np.stack([bank[p][f"aug{k}"] for p in paths]).mean(axis=(1, 2)) for k in range(BANK)]
    x = {"originals": means[0].astype(np.float64), "originals+bank": np.concatenate(means).astype(np.float64)}
    parts = inner_parts(pool, "group_month", 0.25, 18)  # fold 0's seed
    grams = pool[list(TARGETS)].to_numpy(np.float64)
    messages = [m for m in cv_run.log if "ridge base fitted" in m]
    assert len(messages) == 2
    for trainer, message in zip((selection, refit), messages, strict=True):
        rows, alpha, score = sklearn_cv(x, grams, parts, trainer.transform)
        assert f"{rows};" in message and float(message.split("alpha ")[1].split()[0]) == pytest.approx(alpha)
        assert (f"chosen by {parts.max() + 1}-part inner cross-validation over the {N_TRAIN_FOLD0} training images "
                f"(mean weighted R2 {score:.4f})") in message
        # the ridge itself: that choice fitted on the pass's own training images (selection: the inner split's rest)
        fit_paths = list(map(str, trainer.train_df["abs_path"]))
        fit_means = [np.stack([originals[p]["id"] for p in fit_paths]).mean(axis=(1, 2))]
        if rows == "originals+bank":
            fit_means += [np.stack([bank[p][f"aug{k}"] for p in fit_paths]).mean(axis=(1, 2)) for k in range(BANK)]
        xf = np.concatenate(fit_means).astype(np.float64)
        t = trainer.transform.encode(np.tile(trainer.train_df[list(TARGETS)].to_numpy(np.float64),
                                             (len(fit_means), 1)))
        scaler = StandardScaler().fit(xf)
        ridge = Ridge(alpha=alpha).fit(scaler.transform(xf), t)
        query = np.stack([originals[p]["id"] for p in paths])
        expected = np.maximum(ridge.predict(scaler.transform(query.mean(axis=(1, 2)))), MIN_TARGET)
        with torch.no_grad():
            raw = trainer.model.ridge(torch.as_tensor(query[:, 0]), torch.as_tensor(query[:, 1]))
        np.testing.assert_allclose(torch.nn.functional.softplus(raw).numpy(), expected, rtol=1e-3, atol=1e-4)
    assert len(selection.train_df) < N_TRAIN_FOLD0 == len(refit.train_df)


def test_a_part_of_one_image_is_not_scored():
    x, grams, _ = nuisance_problem(n=41, d=8)
    tf = TargetTransform.fit(grams, kind="sqrt")
    parts = np.append(np.arange(40) % 4, 4)  # part 4: a single image, which R² cannot score
    rows, alpha, score = choose_rows_cv({"originals": (x, grams)}, parts, tf)
    # the four scored parts' ridges are fitted with the lone image among their rows, as any other training image
    want = sklearn_cv({"originals": x.mean(axis=(1, 2)).astype(np.float64)}, grams, parts, tf, scored=[0, 1, 2, 3])
    assert (rows, alpha) == want[:2] and score == pytest.approx(want[2], abs=1e-6)


def test_with_select_on_fold_the_choice_is_still_made_inside_the_training_folds(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--freeze-backbone", "--ridge-base", "--aug-prob", "0",
                "--ridge-select", "cv", "--epochs", "1")
    assert run.rc == 0
    trainer = run.trainers[0]
    df = load_train(tiny_data)
    scored = set(df["sample_id_prefix"][make_folds(df, "group_month", 5, 18) == 0])
    assert set(trainer.val_df["sample_id_prefix"]) == scored  # the reference's selection: on the scored fold
    assert not set(trainer.train_folds_df["sample_id_prefix"]) & scored
    assert any(f"inner cross-validation over the {N_TRAIN_FOLD0} training images" in m for m in run.log)
