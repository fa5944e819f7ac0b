"""`--ridge-base` with a feature bank (train/ridge_fit.py): the ridge's rows (each training image's original features,
or those and its K pre-augmented variants) and its alpha are chosen together on the selection images' original
features; without a bank, it is fitted on the originals alone."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from spied_run import train

from biomass5head.constants import TARGETS
from biomass5head.data.feature_cache import FeatureCache, ensure_features
from biomass5head.metrics import compute_metrics
from biomass5head.model.ridge_base import ALPHAS, MIN_TARGET
from biomass5head.model.targets import TargetTransform
from biomass5head.train.ridge_fit import choose_rows, ridge_rows

BANK = 2


def test_ridge_rows_put_the_originals_first_then_each_variant_of_every_image():
    df = pd.DataFrame({"abs_path": ["a.jpg", "b.jpg"], **{t: [1.0 + i, 10.0 + i] for i, t in enumerate(TARGETS)}})
    feat = {p: {v: np.full((2, 1, 3), 100 * i + j, np.float32) for j, v in enumerate(["id", "aug0", "aug1"])}
            for i, p in enumerate(df["abs_path"])}
    originals = {p: {"id": f["id"]} for p, f in feat.items()}
    bank = {p: {"aug1": f["aug1"], "aug0": f["aug0"]} for p, f in feat.items()}  # (dict order must not matter)
    x, grams = ridge_rows(df, originals, bank)
    assert x.shape == (6, 2, 1, 3)
    assert x[:, 0, 0, 0].tolist() == [0, 100, 1, 101, 2, 102]  # a: id, b: id, a: aug0, b: aug0, a: aug1, b: aug1
    np.testing.assert_array_equal(grams, np.tile(df[list(TARGETS)].to_numpy(), (3, 1)))
    x, grams = ridge_rows(df, originals, {})
    assert x[:, 0, 0, 0].tolist() == [0, 100] and grams.shape == (2, 5)


def nuisance_problem(n: int = 60, d: int = 12, seed: int = 0):
    """Tile features (N, 2, 1, D) = signal + a nuisance of large spread along 4 directions the targets ignore
    (the way exposure moves features); targets depend on the first 3 signal coordinates. Returns (features, grams,
    nuisance directions)."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, d))
    dirs = np.linalg.qr(rng.normal(size=(d, 4)))[0].T  # (4, D) orthonormal nuisance directions
    x = signal + 3.0 * rng.normal(size=(n, 4)) @ dirs
    grams = np.square(4 + signal[:, :3] @ rng.uniform(0.5, 1.0, (3, 5)) + rng.normal(0, 0.3, (n, 5)))
    return np.repeat(x[:, None, None], 2, axis=1).astype(np.float32), grams, dirs


def test_augmented_rows_win_where_photos_vary_and_lose_where_they_do_not():
    """choose_rows picks the bank where its variants move the features along what the targets ignore (the selection
    images vary that way too), and keeps the originals where the variants are noise in the signal's directions."""
    x, grams, dirs = nuisance_problem(n=90)
    fit, sel = slice(0, 30), slice(30, 90)  # few fitting images, so the ridge cannot learn the nuisance from them
    rng = np.random.default_rng(1)
    tf = TargetTransform.fit(grams[fit], kind="sqrt")
    nuisance = [x[fit] + (3.0 * rng.normal(size=(30, 4)) @ dirs)[:, None, None].astype(np.float32) for _ in range(8)]
    helpful = {"originals": (x[fit], grams[fit]),
               "originals+bank": (np.concatenate([x[fit], *nuisance]), np.tile(grams[fit], (9, 1)))}
    rows, alpha, _, n_rows = choose_rows(helpful, x[sel], grams[sel], tf)
    assert rows == "originals+bank" and n_rows == 270 and alpha in ALPHAS
    signal_noise = [x[fit] + rng.normal(0, 3.0, size=x[fit].shape).astype(np.float32) for _ in range(8)]
    harmful = {"originals": (x[fit], grams[fit]),
               "originals+bank": (np.concatenate([x[fit], *signal_noise]), np.tile(grams[fit], (9, 1)))}
    rows, _, _, n_rows = choose_rows(harmful, x[sel], grams[sel], tf)
    assert rows == "originals" and n_rows == 30
    # the same candidate twice: a tie keeps the first
    same = {"first": (x[fit], grams[fit]), "second": (x[fit], grams[fit])}
    assert choose_rows(same, x[sel], grams[sel], tf)[0] == "first"


@pytest.fixture(scope="module")
def bank_run(tiny_data, tmp_path_factory):
    return train(tmp_path_factory, tiny_data, "--select-on", "inner", "--inner-frac", "0.25", "--freeze-backbone",
                 "--ridge-base", "--target-transform", "sqrt", "--aug-prob", "0.5", "--feature-bank", str(BANK),
                 "--epochs", "1")


def sklearn_choice(x_fit: dict, t_fit: np.ndarray, x_sel: np.ndarray, sel_grams: np.ndarray, decode):
    """(score, alpha, rows, fitted pipeline) of the best scikit-learn ridge over candidates and alphas, chosen like
    the trainer (weighted R^2 in grams on the selection images; ties keep the earlier candidate and alpha)."""
    best = None
    for rows, x in x_fit.items():
        t = np.tile(t_fit, (len(x) // len(t_fit), 1))
        scaler = StandardScaler().fit(x)
        for alpha in ALPHAS:
            ridge = Ridge(alpha=alpha).fit(scaler.transform(x), t)
            pred = decode(np.maximum(ridge.predict(scaler.transform(x_sel)), MIN_TARGET))
            score = compute_metrics(sel_grams, pred)["weighted_r2"]
            if best is None or score > best[0] + 1e-9:
                best = (score, alpha, rows, (scaler, ridge))
    return best


def test_with_a_feature_bank_the_rows_and_alpha_are_sklearns_best_on_the_selection_images(bank_run):
    assert bank_run.rc == 0
    trainer = bank_run.trainers[0]
    # the features as the cache holds them, read back independently of the trainer's tables
    root, key, common = trainer._feature_cache()
    paths = list(map(str, trainer.train_df["abs_path"]))
    sel_paths = list(map(str, trainer.val_df["abs_path"]))
    originals = ensure_features(FeatureCache(root, **key), trainer.model, paths + sel_paths, ["id"], **common)
    bank = ensure_features(FeatureCache(root, **key, aug_key=trainer.feature_plan.aug_key), trainer.model, paths,
                           [f"aug{k}" for k in range(BANK)], **common)
    means = [np.stack([originals[p]["id"] for p in paths]).mean(axis=(1, 2))]
    means += [np.stack([bank[p][f"aug{k}"] for p in paths]).mean(axis=(1, 2)) for k in range(BANK)]
    assert not np.allclose(means[0], means[1])  # the variants are other features than the originals
    x_fit = {"originals": means[0].astype(np.float64), "originals+bank": np.concatenate(means).astype(np.float64)}
    x_sel = np.stack([originals[p]["id"] for p in sel_paths]).mean(axis=(1, 2)).astype(np.float64)
    enc, dec = trainer.transform.encode, trainer.transform.decode
    sel_grams = trainer.val_df[list(TARGETS)].to_numpy(np.float64)
    score, alpha, rows, (scaler, ridge) = sklearn_choice(
        x_fit, enc(trainer.train_df[list(TARGETS)].to_numpy(np.float64)), x_sel, sel_grams, dec)
    n_fit = len(paths)
    n_rows = n_fit * (1 + BANK) if rows == "originals+bank" else n_fit
    message = next(m for m in bank_run.log if "ridge base fitted" in m)
    assert f"ridge base fitted on {n_fit} images ({n_rows} rows: {rows};" in message
    assert float(message.split("alpha ")[1].split()[0]) == pytest.approx(alpha)
    query = np.stack([originals[p]["id"] for p in sel_paths])
    expected = ridge.predict(scaler.transform(query.mean(axis=(1, 2))))
    with torch.no_grad():
        raw = trainer.model.ridge(torch.as_tensor(query[:, 0]), torch.as_tensor(query[:, 1]))
    np.testing.assert_allclose(torch.nn.functional.softplus(raw).numpy(), np.maximum(expected, MIN_TARGET),
                               rtol=1e-3, atol=1e-4)


def test_without_a_bank_the_ridge_is_fitted_on_the_originals_only(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--select-on", "inner", "--inner-frac", "0.25", "--freeze-backbone",
                "--ridge-base", "--aug-prob", "0", "--epochs", "1")
    assert run.rc == 0
    n_fit = len(run.trainers[0].train_df)
    assert any(f"ridge base fitted on {n_fit} images ({n_fit} rows: originals;" in m for m in run.log)
