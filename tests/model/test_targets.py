"""TargetTransform: grams <-> model space, numpy and torch, log and identity, checkpoint form."""
import json
import math

import numpy as np
import pytest
import torch

from biomass5head.model.targets import SCALE_EPS, TargetTransform


def _grams(seed=0, n=40):
    rng = np.random.default_rng(seed)
    green, dead, clover = rng.gamma(2.0, 15.0, n), rng.gamma(1.0, 8.0, n), rng.gamma(0.7, 6.0, n)
    dead[:5] = 0.0
    return np.stack([green, dead, clover, green + clover, green + dead + clover], axis=1)


@pytest.mark.parametrize("log_target", [False, True])
def test_round_trip_numpy_and_torch(log_target):
    y = _grams()
    tf = TargetTransform.fit(y, log_target)
    t = tf.encode(y)
    assert isinstance(t, np.ndarray) and t.shape == y.shape
    np.testing.assert_allclose(tf.decode(t), y, rtol=1e-10, atol=1e-10)
    yt = torch.tensor(y, dtype=torch.float64)
    tt = tf.encode(yt)
    assert isinstance(tt, torch.Tensor) and tt.dtype == torch.float64
    np.testing.assert_allclose(tt.numpy(), t, rtol=1e-12)
    torch.testing.assert_close(tf.decode(tt), yt)
    # float32 tensors stay float32
    assert tf.encode(yt.float()).dtype == torch.float32


def test_log_vs_identity_scale():
    y = _grams()
    ident, log = TargetTransform.fit(y, False), TargetTransform.fit(y, True)
    np.testing.assert_allclose(ident.scale, y.mean(axis=0))
    np.testing.assert_allclose(log.scale, np.log1p(y).mean(axis=0))
    # The model-space mean of each target is 1 on the fitting data.
    np.testing.assert_allclose(ident.encode(y).mean(axis=0), 1.0)
    np.testing.assert_allclose(log.encode(y).mean(axis=0), 1.0)
    np.testing.assert_allclose(log.encode(y), np.log1p(y) / log.scale)
    assert log.gram_scale == pytest.approx(y[:, 4].mean())


def test_zero_target_uses_floor_and_zero_maps_to_zero():
    y = _grams()
    y[:, 2] = 0.0  # no clover in the fold
    tf = TargetTransform.fit(y, True)
    assert tf.scale[2] == SCALE_EPS
    assert np.all(np.isfinite(tf.encode(y)))
    assert np.all(tf.encode(np.zeros((1, 5))) == 0.0)


def test_decode_clamps_negative_and_keeps_nan():
    for log_target in (False, True):
        tf = TargetTransform([2.0, 1.0, 1.0, 2.0, 3.0], log_target)
        t = np.array([[-1.0, 0.5, -0.1, 1.0, 1.0]])
        g = tf.decode(t)
        assert g[0, 0] == 0.0 and g[0, 2] == 0.0 and g[0, 1] > 0
        gt = tf.decode(torch.tensor(t))
        assert float(gt.min()) == 0.0
        assert np.isnan(tf.decode(np.array([[np.nan, 1, 1, 1, 1]]))[0, 0])
        assert torch.isnan(tf.decode(torch.tensor([[float("nan"), 1.0, 1, 1, 1]]))[0, 0])


def test_decode_does_not_overflow_float32():
    tf = TargetTransform([4.0] * 5, True)
    g = tf.decode(torch.full((2, 5), 50.0))  # expm1(200) would be inf in float32
    assert torch.isfinite(g).all()


def test_decode_is_differentiable():
    tf = TargetTransform([3.0, 2.0, 1.0, 3.0, 4.0], True)
    t = torch.full((3, 5), 0.8, requires_grad=True)
    tf.decode(t).sum().backward()
    assert torch.isfinite(t.grad).all() and bool((t.grad > 0).all())


def test_to_dict_from_dict_plain_types():
    tf = TargetTransform.fit(_grams(), True)
    d = tf.to_dict()
    json.dumps(d)  # plain Python types only
    assert isinstance(d["scale"], list) and all(isinstance(s, float) for s in d["scale"])
    back = TargetTransform.from_dict(d)
    assert back.log_target is True and back.gram_scale == tf.gram_scale
    np.testing.assert_array_equal(back.scale, tf.scale)


def test_checkpoint_round_trip_weights_only(tmp_path):
    tf = TargetTransform.fit(_grams(), False)
    torch.save({"target_transform": tf.to_dict()}, tmp_path / "c.pth")
    d = torch.load(tmp_path / "c.pth", weights_only=True)["target_transform"]
    np.testing.assert_array_equal(TargetTransform.from_dict(d).scale, tf.scale)


@pytest.mark.parametrize(
    "y", [np.ones((3, 4)), np.zeros((0, 5)), np.array([[1.0, -2.0, 1, 1, 1]]), np.array([[math.nan, 1, 1, 1, 1]])]
)
def test_fit_rejects_bad_input(y):
    with pytest.raises(ValueError):
        TargetTransform.fit(y, True)


def test_init_rejects_bad_scale():
    with pytest.raises(ValueError):
        TargetTransform([1.0, 0.0, 1.0, 1.0, 1.0], False)
    with pytest.raises(ValueError):
        TargetTransform([1.0] * 4, False)
