"""--scale-aug-prob P / --scale-range / --scale-pad: a random zoom out (padded) or in about the view's centre, identical
on both stereo views, independent of --aug-prob, and baked into the feature bank when the backbone is frozen."""
from __future__ import annotations

import json

import numpy as np
import pytest

from biomass5head.cli.train import build_parser, config_from_args
from biomass5head.config import ConfigError
from biomass5head.data.augment import NEUTRAL_GREY, StereoAugment, augment_from_config
from biomass5head.data.feature_cache import plan_feature_path

H = W = 64


def _views(seed=0):
    """A left view of smooth random texture (no grey) and a right view that differs from it everywhere."""
    rng = np.random.default_rng(seed)
    left = rng.integers(0, 100, size=(H, W, 3), dtype=np.uint8)
    return left, (left + 150).astype(np.uint8)  # values 150-249: never 128 either


def _grey(view):
    return np.all(view == np.array(NEUTRAL_GREY, np.uint8), axis=-1)


def test_zoom_out_with_grey_pad_shrinks_the_view_into_a_grey_frame_on_both_views():
    left, right = _views()
    aug = StereoAugment(aug_prob=0.0, scale_prob=1.0, scale_range=(0.5, 0.5), scale_pad="grey", seed=0)
    out_l, out_r = aug(left, right)
    assert out_l.shape == left.shape and out_l.dtype == np.uint8
    grey_l, grey_r = _grey(out_l), _grey(out_r)
    np.testing.assert_array_equal(grey_l, grey_r)  # the same geometry on both views
    assert grey_l[:10].all() and grey_l[-10:].all() and grey_l[:, :10].all() and grey_l[:, -10:].all()
    assert not grey_l[20:44, 20:44].any()  # the photo, at half size, in the middle
    assert 0.70 < grey_l.mean() < 0.80  # 1 - 0.5^2 of the area is border
    # The middle holds the whole photo at half size: its mean colour is the photo's.
    assert abs(out_l[18:46, 18:46].mean() - left.mean()) < 3


def test_zoom_out_with_reflect_pad_fills_the_border_with_the_photo():
    left, right = _views()
    out_l, _ = StereoAugment(aug_prob=0.0, scale_prob=1.0, scale_range=(0.5, 0.5), seed=0)(left, right)
    assert not _grey(out_l).any()
    assert out_l.max() < 100  # only the photo's own colours (no fill)
    assert abs(out_l[:10].mean() - left.mean()) < 5
    # ... and the photo itself at half size in the middle: its 2x2 block means, not the photo's own middle.
    half = left.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(out_l[16:48, 16:48].astype(float) - half).mean() < 8
    assert np.abs(out_l[16:48, 16:48].astype(float) - left[16:48, 16:48]).mean() > 20


def test_zoom_in_enlarges_the_centre_and_crops_the_edges():
    left = np.zeros((H, W, 3), np.uint8)
    left[24:40, 24:40] = 255  # a white square of a quarter of the side in the middle
    out_l, out_r = StereoAugment(aug_prob=0.0, scale_prob=1.0, scale_range=(2.0, 2.0), seed=0)(left, left.copy())
    white = out_l[..., 0] > 128
    assert 0.20 < white.mean() < 0.30  # 1/16 of the area, zoomed x2 per side: 1/4
    assert white[32, 32] and not white[2, 2]
    np.testing.assert_array_equal(out_l, out_r)


def test_the_factor_is_drawn_from_the_range():
    left, right = _views()
    aug = StereoAugment(aug_prob=0.0, scale_prob=1.0, scale_range=(0.5, 0.9), scale_pad="grey", seed=3)
    borders = set()
    for _ in range(20):
        out_l, out_r = aug(left, right)
        grey_l = _grey(out_l)
        np.testing.assert_array_equal(grey_l, _grey(out_r))
        borders.add(int(grey_l.all(axis=1).sum()))
    assert len(borders) >= 4  # factors vary from draw to draw
    assert max(borders) <= int(0.5 * H) + 2 and min(borders) >= int(0.1 * H) - 2


def test_stereo_correct_augmentation_splits_the_colours_but_not_the_zoom():
    """With every transform on and per-view colour changes, a white square in the middle of both views still has
    the same place and size on both (the zoom and the geometry are shared), while the pixels differ."""
    view = np.zeros((128, 128, 3), np.uint8)
    view[48:80, 48:80] = 255
    aug = StereoAugment(aug_prob=1.0, stereo_correct=True, scale_prob=1.0, scale_range=(0.5, 1.5), seed=5)
    areas, differ = [], 0
    for _ in range(12):
        out_l, out_r = aug(view, view.copy())
        mask_l, mask_r = out_l.mean(-1) > 128, out_r.mean(-1) > 128
        iou = (mask_l & mask_r).sum() / max(1, (mask_l | mask_r).sum())
        assert iou > 0.8
        areas.append(int(mask_l.sum()))
        differ += not np.array_equal(out_l, out_r)
    assert differ >= 10  # the colours were drawn per view
    assert max(areas) > 2 * min(areas)  # zoom factors from 0.5 to 1.5: areas from 1/4 to 9/4 of the square


def test_probability_zero_is_the_identity_and_the_zoom_needs_no_aug_prob():
    left, right = _views()
    out = StereoAugment(aug_prob=0.0, scale_prob=0.0, seed=0)(left, right)
    assert out[0] is left and out[1] is right
    draws = StereoAugment(aug_prob=0.0, scale_prob=0.5, scale_range=(0.5, 0.5), scale_pad="grey", seed=1)
    zoomed = [_grey(draws(left, right)[0]).any() for _ in range(40)]
    assert 10 < sum(zoomed) < 30  # about half


def parse(*args):
    return config_from_args(build_parser().parse_args(["--freeze-backbone", *args]))


def test_options_reach_the_config_and_the_training_augmentation():
    cfg = parse("--scale-aug-prob", "0.4", "--scale-range", "0.6", "1.1", "--scale-pad", "grey")
    assert (cfg.aug.scale_aug_prob, cfg.aug.scale_range, cfg.aug.scale_pad) == (0.4, (0.6, 1.1), "grey")
    aug = augment_from_config(cfg.aug)
    assert (aug.scale_prob, aug.scale_range, aug.scale_pad) == (0.4, (0.6, 1.1), "grey")
    assert parse().aug.scale_aug_prob == 0.0  # off by default (the reference)


@pytest.mark.parametrize("args, words", [
    (("--scale-aug-prob", "1.5"), "--scale-aug-prob must be in [0, 1]"),
    (("--scale-range", "0.1", "1.0"), "--scale-range needs LOW HIGH with 0.25 <= LOW <= HIGH <= 4"),
    (("--scale-range", "1.2", "0.8"), "--scale-range needs LOW HIGH"),
])
def test_bad_values_are_refused(args, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse(*args)


def test_a_frozen_run_bakes_the_zoom_into_the_feature_bank():
    plain = plan_feature_path(parse("--aug-prob", "0"))
    zoom = plan_feature_path(parse("--aug-prob", "0", "--scale-aug-prob", "0.5"))
    assert plain.variants == ("id",) and not plain.aug_key
    assert zoom.use and zoom.variants[0].startswith("aug") and "--scale-aug-prob 0.5" in zoom.message
    key = json.loads(zoom.aug_key)
    assert key["scale_prob"] == 0.5 and key["scale_range"] == [0.75, 1.25] and key["scale_pad"] == "reflect"
    other = plan_feature_path(parse("--aug-prob", "0", "--scale-aug-prob", "0.5", "--scale-pad", "grey"))
    assert other.aug_key != zoom.aug_key
    # Banks written without the option keep the key they had before it existed.
    assert plan_feature_path(parse()).aug_key == json.dumps({"aug_prob": 0.5, "stereo_correct": False, "seed": 18})
