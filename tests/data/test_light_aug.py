"""--light-aug-prob P: a cast shadow and a daylight white balance, identical on both stereo views, independent of
--aug-prob, and baked into the feature bank (under its own key) when the backbone is frozen."""
from __future__ import annotations

import json

import numpy as np
import pytest

from biomass5head.cli.train import build_parser, config_from_args
from biomass5head.config import ConfigError
from biomass5head.data.augment import StereoAugment, augment_from_config
from biomass5head.data.feature_cache import plan_feature_path


def _view(seed=0, size=96):
    """Flat mid-grey with a little texture: any shadow or colour cast shows against it."""
    rng = np.random.default_rng(seed)
    return (128 + rng.integers(-10, 11, size=(size, size, 3))).astype(np.uint8)


def _shadow_mask(out, view):
    """Pixels at least 20 % darker than the input (grey level summed over the channels)."""
    return out.astype(int).sum(-1) < 0.8 * view.astype(int).sum(-1)


def _lit(seed: int, n: int):
    """The flat view and n (left, right) draws of the light alone at p = 1 on a copy of it on both sides."""
    view = _view()
    aug = StereoAugment(aug_prob=0.0, light_prob=1.0, seed=seed)
    return view, [aug(view, view.copy()) for _ in range(n)]


def test_a_shadow_darkens_part_of_both_views_in_the_same_place():
    view, draws = _lit(seed=3, n=10)
    fractions = []
    for out_l, out_r in draws:
        assert out_l.shape == view.shape and out_l.dtype == np.uint8
        np.testing.assert_array_equal(out_l, out_r)  # identical inputs stay identical: one light for the scene
        mask = _shadow_mask(out_l, view)
        fractions.append(mask.mean())
        if mask.any():  # darkened by 25-60 % (the white balance moves the channels by less than that)
            ratio = out_l[mask].astype(int).sum() / view[mask].astype(int).sum()
            assert 0.3 < ratio < 0.8
    assert all(0.0 < f < 1.0 for f in fractions)  # p = 1: a shadow every time, never the whole view
    assert len({round(f, 3) for f in fractions}) >= 5  # shapes and places vary from draw to draw


def test_the_white_balance_tints_the_view():
    view, draws = _lit(seed=4, n=12)
    ratios = []
    for out, _ in draws:
        lit = ~_shadow_mask(out, view)
        red, blue = out[lit][:, 0].astype(float).mean(), out[lit][:, 2].astype(float).mean()
        ratios.append(red / blue)
    # Black-body light from 3000 K (warm: red over blue) to 15000 K (cool: blue over red).
    assert max(ratios) > 1.1 and min(ratios) < 0.97


def test_probability_zero_is_the_identity_and_the_light_needs_no_aug_prob():
    view = _view()
    out = StereoAugment(aug_prob=0.0, light_prob=0.0, seed=0)(view, view.copy())
    assert np.array_equal(out[0], view)
    aug = StereoAugment(aug_prob=0.0, light_prob=0.5, seed=1)
    changed = [not np.array_equal(aug(view, view.copy())[0], view) for _ in range(40)]
    assert 20 < sum(changed) < 40  # a shadow or a tint in 1 - 0.5^2 = 75 % of draws


def test_without_the_light_every_draw_is_what_it_was_before_the_option():
    """The light has its own random stream: adding the option changed no earlier augmentation (or feature bank)."""
    view = _view(size=64)
    a = StereoAugment(aug_prob=0.8, seed=11)
    b = StereoAugment(aug_prob=0.8, seed=11, light_prob=0.0)
    for _ in range(5):
        for x, y in zip(a(view, view.copy()), b(view, view.copy()), strict=True):
            np.testing.assert_array_equal(x, y)


def parse(*args):
    return config_from_args(build_parser().parse_args(["--freeze-backbone", *args]))


def test_the_option_reaches_the_config_the_augmentation_and_the_bank_key():
    cfg = parse("--light-aug-prob", "0.4")
    assert cfg.aug.light_aug_prob == 0.4 and augment_from_config(cfg.aug).light_prob == 0.4
    assert parse().aug.light_aug_prob == 0.0  # off by default (the reference)
    plan = plan_feature_path(cfg)
    assert plan.use and "--light-aug-prob 0.4" in plan.message
    assert json.loads(plan.aug_key)["light_prob"] == 0.4
    assert plan.aug_key != plan_feature_path(parse()).aug_key
    # Light alone (--aug-prob 0) still makes a bank of lit variants.
    alone = plan_feature_path(parse("--aug-prob", "0", "--light-aug-prob", "0.5"))
    assert alone.variants[0].startswith("aug") and json.loads(alone.aug_key)["light_prob"] == 0.5


def test_a_bad_probability_is_refused():
    with pytest.raises(ConfigError, match=r"--light-aug-prob must be in \[0, 1\]"):
        parse("--light-aug-prob", "1.2")
