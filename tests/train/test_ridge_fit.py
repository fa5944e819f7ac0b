"""`--ridge-base` with a feature bank (train/ridge_fit.py): the ridge is fitted on the rows the heads train on, each
training image's original features and its K pre-augmented variants, with the alpha chosen on the selection images'
original features; without a bank, on the originals alone."""
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
from biomass5head.model.ridge_base import MIN_TARGET
from biomass5head.train.ridge_fit import ridge_rows

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


@pytest.fixture(scope="module")
def bank_run(tiny_data, tmp_path_factory):
    return train(tmp_path_factory, tiny_data, "--select-on", "inner", "--inner-frac", "0.25", "--freeze-backbone",
                 "--ridge-base", "--target-transform", "sqrt", "--aug-prob", "0.5", "--feature-bank", str(BANK),
                 "--epochs", "1")


def test_with_a_feature_bank_the_ridge_is_sklearns_ridge_on_originals_and_variants(bank_run):
    assert bank_run.rc == 0
    trainer = bank_run.trainers[0]
    n_fit = len(trainer.train_df)
    assert any(f"ridge base fitted on {n_fit} images ({n_fit * (1 + BANK)} rows" in m for m in bank_run.log)
    alpha = float(next(m for m in bank_run.log if "ridge base fitted" in m).split("alpha ")[1].split()[0])
    # the features as the cache holds them, read back independently of the trainer's tables
    root, key, common = trainer._feature_cache()
    paths = list(map(str, trainer.train_df["abs_path"]))
    originals = ensure_features(FeatureCache(root, **key), trainer.model, paths, ["id"], **common)
    bank = ensure_features(FeatureCache(root, **key, aug_key=trainer.feature_plan.aug_key), trainer.model, paths,
                           [f"aug{k}" for k in range(BANK)], **common)
    mean = [np.stack([originals[p]["id"] for p in paths]).mean(axis=(1, 2))]
    mean += [np.stack([bank[p][f"aug{k}"] for p in paths]).mean(axis=(1, 2)) for k in range(BANK)]
    x = np.concatenate(mean).astype(np.float64)
    assert not np.allclose(mean[0], mean[1])  # the variants are other features than the originals
    t = np.tile(trainer.transform.encode(trainer.train_df[list(TARGETS)].to_numpy(np.float64)), (1 + BANK, 1))
    scaler = StandardScaler().fit(x)
    query = np.stack([originals[p]["id"] for p in paths[:4]])
    expected = Ridge(alpha=alpha).fit(scaler.transform(x), t).predict(scaler.transform(query.mean(axis=(1, 2))))
    with torch.no_grad():
        raw = trainer.model.ridge(torch.as_tensor(query[:, 0]), torch.as_tensor(query[:, 1]))
    np.testing.assert_allclose(torch.nn.functional.softplus(raw).numpy(), np.maximum(expected, MIN_TARGET),
                               rtol=1e-3, atol=1e-4)


def test_without_a_bank_the_ridge_is_fitted_on_the_originals_only(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--select-on", "inner", "--inner-frac", "0.25", "--freeze-backbone",
                "--ridge-base", "--aug-prob", "0", "--epochs", "1")
    assert run.rc == 0
    n_fit = len(run.trainers[0].train_df)
    assert any(f"ridge base fitted on {n_fit} images ({n_fit} rows" in m for m in run.log)
