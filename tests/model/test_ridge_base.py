"""`--ridge-base` (model/ridge_base.py) and `--target-transform sqrt` (model/targets.py): the closed-form ridge inside
the model equals scikit-learn's ridge, chooses alpha on the selection images only, is where a model with zeroed
heads starts, and travels in the state dict; the sqrt space round-trips grams."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from biomass5head.metrics import compute_metrics
from biomass5head.model.five_head import FiveHeadModel
from biomass5head.model.ridge_base import ALPHAS, MIN_TARGET, RidgeBase, choose_ridge
from biomass5head.model.targets import TargetTransform

D, T = 16, 3


class Stub(torch.nn.Module):
    num_features = D


def problem(seed=0, n=80):
    """(N, 2, T, D) tile features whose mean over tiles predicts sqrt(grams) linearly, plus noise."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 2, T, D)).astype(np.float32)
    mean = feats.reshape(n, -1, D).mean(1)
    grams = np.square(np.clip(3 + mean[:, :5] @ rng.uniform(0.5, 1.5, (5, 5)) + rng.normal(0, 0.1, (n, 5)), 0.1, None))
    return feats, grams


def score(true, pred):
    return compute_metrics(true, pred)["weighted_r2"]


def fit_ridge_base(base, fit_feats, fit_t, select_feats, select_grams, decode, score):
    """Set `base` to the ridge `choose_ridge` picks on the selection images; return its alpha."""
    _, alpha, fit = choose_ridge(fit_feats, fit_t, select_feats, select_grams, decode, score)
    base.set(*fit)
    return alpha


def test_fit_equals_sklearn_ridge_on_standardised_mean_features():
    feats, grams = problem()
    tf = TargetTransform.fit(grams[:60], kind="sqrt")
    base = RidgeBase(D)
    alpha = fit_ridge_base(base, feats[:60], tf.encode(grams[:60]), feats[60:], grams[60:], tf.decode, score)
    assert alpha in ALPHAS
    mean = feats.reshape(80, -1, D).mean(1)
    scaler = StandardScaler().fit(mean[:60])
    expected = Ridge(alpha=alpha).fit(scaler.transform(mean[:60]), tf.encode(grams[:60])).predict(
        scaler.transform(mean[60:]))
    with torch.no_grad():
        raw = base(torch.as_tensor(feats[60:, 0]), torch.as_tensor(feats[60:, 1]))
    np.testing.assert_allclose(torch.nn.functional.softplus(raw).numpy(), np.maximum(expected, MIN_TARGET),
                               rtol=1e-4, atol=1e-5)


def test_alpha_is_chosen_on_the_selection_images_only():
    feats, grams = problem(1)
    tf = TargetTransform.fit(grams[:60], kind="sqrt")
    first = fit_ridge_base(RidgeBase(D), feats[:60], tf.encode(grams[:60]), feats[60:], grams[60:], tf.decode, score)
    # a score that prefers the strongest shrinkage (constant predictions score best) picks the largest alpha
    spread = fit_ridge_base(RidgeBase(D), feats[:60], tf.encode(grams[:60]), feats[60:], grams[60:], tf.decode,
                            lambda true, pred: -float(pred.std(axis=0).sum()))
    assert spread == ALPHAS[-1] and first < ALPHAS[-1]


def test_a_model_with_a_ridge_base_starts_at_the_ridge_and_keeps_it_in_its_state_dict():
    feats, grams = problem(2)
    tf = TargetTransform.fit(grams, kind="sqrt")
    model = FiveHeadModel(Stub(), ridge_base=True).eval()
    fit_ridge_base(model.ridge, feats[:60], tf.encode(grams[:60]), feats[60:], grams[60:], tf.decode, score)
    left, right = torch.as_tensor(feats[:, 0]), torch.as_tensor(feats[:, 1])
    with torch.no_grad():
        start = model.forward_features(left, right)["reg"]
        ridge_t = torch.nn.functional.softplus(model.ridge(left, right))
    torch.testing.assert_close(start, ridge_t)  # zeroed last layers: the heads add nothing yet
    assert {"ridge.weight", "ridge.bias", "ridge.feature_mean", "ridge.feature_std"} <= set(model.state_dict())
    assert not any(n.startswith("ridge.") for n, _ in model.named_parameters())  # fitted, never trained
    clone = FiveHeadModel(Stub(), ridge_base=True).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clone.forward_features(left, right)["reg"], start)


def test_without_a_ridge_base_the_heads_are_not_zeroed():
    model = FiveHeadModel(Stub())
    assert model.ridge is None and all(h.net[-1].weight.abs().sum() > 0 for h in model.heads)


@pytest.mark.parametrize("kind", ["identity", "log1p", "sqrt"])
def test_target_spaces_round_trip_and_persist(kind):
    grams = np.array([[0.0, 1.0, 4.0, 9.0, 100.0], [2.5, 0.0, 0.3, 7.0, 40.0]])
    tf = TargetTransform.fit(grams, kind=kind)
    np.testing.assert_allclose(tf.decode(tf.encode(grams)), grams, atol=1e-9)
    torch.testing.assert_close(tf.decode(tf.encode(torch.tensor(grams))), torch.tensor(grams))
    again = TargetTransform.from_dict(tf.to_dict())
    assert again.kind == kind and again.log_target == (kind == "log1p")
    if kind == "sqrt":
        np.testing.assert_allclose(tf.encode(grams) * tf.scale, np.sqrt(grams))
        assert (tf.decode(np.array([[-1.0] * 5])) == 0).all()  # negative model outputs mean 0 g


def test_checkpoints_without_a_kind_still_load():
    old = {"log_target": True, "scale": [1.0] * 5, "gram_scale": 10.0}
    assert TargetTransform.from_dict(old).kind == "log1p"
    assert TargetTransform.from_dict({**old, "log_target": False}).kind == "identity"
