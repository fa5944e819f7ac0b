"""Stereo augmentation: shared geometry, shared or independent photometry, swap, identity, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from biomass5head.data.augment import PHOTO_WEIGHTS, StereoAugment, hflip_views, vflip_views


def flat_view(shape=(32, 32), value=100, marker=True) -> np.ndarray:
    """Uniform grey view with a bright marker in the top-left corner, so flips and rotations can be told apart."""
    view = np.full((*shape, 3), value, dtype=np.uint8)
    if marker:
        view[1:5, 1:5] = 255
    return view


def marker_corner(view: np.ndarray) -> tuple[int, int]:
    """Which quadrant (row half, column half) is brightest on average (the one holding the marker)."""
    h, w = view.shape[:2]
    gray = view.astype(np.float32).mean(axis=2)
    quads = {(r, c): gray[r * h // 2:(r + 1) * h // 2, c * w // 2:(c + 1) * w // 2].mean()
             for r in (0, 1) for c in (0, 1)}
    return max(quads, key=quads.get)


def test_flip_helpers():
    left = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    right = left + 1
    hl, hr = hflip_views(left, right)
    vl, vr = vflip_views(left, right)
    assert np.array_equal(hl, left[:, ::-1]) and np.array_equal(hr, right[:, ::-1])
    assert np.array_equal(vl, left[::-1]) and np.array_equal(vr, right[::-1])
    assert all(x.flags["C_CONTIGUOUS"] for x in (hl, hr, vl, vr))


@pytest.mark.parametrize("shape", [(32, 32), (28, 56)])
@pytest.mark.parametrize("stereo_correct", [False, True])
def test_shape_and_dtype_preserved(shape, stereo_correct):
    rng = np.random.default_rng(1)
    left = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    right = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    aug = StereoAugment(aug_prob=1.0, stereo_correct=stereo_correct, swap_prob=0.5, seed=0)
    for _ in range(20):
        out_l, out_r = aug(left, right)
        assert out_l.shape == left.shape and out_r.shape == right.shape
        assert out_l.dtype == np.uint8 and out_r.dtype == np.uint8
        assert out_l.flags["C_CONTIGUOUS"] and out_r.flags["C_CONTIGUOUS"]


def test_identity_when_all_probabilities_zero():
    left, right = flat_view(), flat_view(value=60)
    aug = StereoAugment(aug_prob=0.0, stereo_correct=True, swap_prob=0.0, seed=3)
    for _ in range(5):
        out_l, out_r = aug(left, right)
        assert np.array_equal(out_l, left) and np.array_equal(out_r, right)


def test_swap_prob_one_swaps():
    left, right = flat_view(value=10), flat_view(value=200)
    out_l, out_r = StereoAugment(aug_prob=0.0, swap_prob=1.0, seed=0)(left, right)
    assert out_l is right and out_r is left


def test_swap_prob_half_is_roughly_half():
    left, right = flat_view(value=10), flat_view(value=200)
    aug = StereoAugment(aug_prob=0.0, swap_prob=0.5, seed=0)
    swaps = sum(aug(left, right)[0] is right for _ in range(1000))
    assert 430 < swaps < 570


@pytest.mark.parametrize("shape", [(32, 32), (28, 56)])
@pytest.mark.parametrize("stereo_correct", [False, True])
def test_geometry_shared_by_both_views(shape, stereo_correct):
    """The marker ends in the same corner of both views, whatever flips or rotation were drawn."""
    view = flat_view(shape)
    aug = StereoAugment(aug_prob=1.0, stereo_correct=stereo_correct, seed=5)
    corners = set()
    for _ in range(40):
        out_l, out_r = aug(view, view.copy())
        assert marker_corner(out_l) == marker_corner(out_r)
        corners.add(marker_corner(out_l))
    assert len(corners) >= 3  # flips really happen, and not always together


def augmented_twins(stereo_correct: bool, n: int = 20) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """A flat view and n full-strength augmentations of it used as both stereo views."""
    view = flat_view()
    aug = StereoAugment(aug_prob=1.0, stereo_correct=stereo_correct, seed=11)
    return view, [aug(view, view.copy()) for _ in range(n)]


def test_stereo_correct_photometry_differs_between_views():
    differing = 0
    for out_l, out_r in augmented_twins(stereo_correct=True)[1]:
        assert marker_corner(out_l) == marker_corner(out_r)
        # Noise drawn per view: the pixel-wise difference is not zero even where the brightness happens to match.
        differing += not np.array_equal(out_l, out_r)
        bg_l, bg_r = np.median(out_l), np.median(out_r)
        differing += abs(float(bg_l) - float(bg_r)) > 2
    assert differing >= 30


def test_non_stereo_correct_photometry_identical_on_identical_views():
    view, twins = augmented_twins(stereo_correct=False)
    changed = 0
    for out_l, out_r in twins:
        assert np.array_equal(out_l, out_r)
        changed += not np.array_equal(out_l, view)
    assert changed >= 15


def test_same_seed_same_output_and_reseed():
    rng = np.random.default_rng(2)
    left = rng.integers(0, 256, (28, 56, 3), dtype=np.uint8)
    right = rng.integers(0, 256, (28, 56, 3), dtype=np.uint8)

    def run(aug):
        return [aug(left, right) for _ in range(5)]

    a, b = run(StereoAugment(1.0, True, 0.5, seed=42)), run(StereoAugment(1.0, True, 0.5, seed=42))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in (0, 1))
    other = run(StereoAugment(1.0, True, 0.5, seed=43))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, other, strict=True))
    aug = StereoAugment(1.0, True, 0.5, seed=7)
    run(aug)
    aug.reseed(42)
    again = run(aug)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, again, strict=True) for k in (0, 1))


def test_aug_prob_sets_transform_probabilities():
    aug = StereoAugment(aug_prob=0.4, seed=0)
    probs = {type(t).__name__: t.p for t in aug._photo.transforms}
    assert probs["RandomBrightnessContrast"] == pytest.approx(0.4 * PHOTO_WEIGHTS["brightness_contrast"])
    assert probs["GaussNoise"] == pytest.approx(0.4 * PHOTO_WEIGHTS["noise"])
    geo = {type(t).__name__: t.p for t in aug._geo.transforms}
    assert geo["HorizontalFlip"] == pytest.approx(0.4) and geo["Affine"] == pytest.approx(0.4)
    assert {type(t).__name__: t.p for t in StereoAugment(aug_prob=1.0)._geo.transforms}["HorizontalFlip"] == 0.5


def test_flip_rates_roughly_respected_and_independent():
    """aug_prob=0.5 on a non-square view (no rot90): each flip about half the time, both about a quarter.

    The "both" count guards against albumentations 2.0 giving every transform the same seed, which makes the
    two flips always coincide.
    """
    view = flat_view((28, 56))
    aug = StereoAugment(aug_prob=0.5, seed=9)
    corners = [marker_corner(aug(view, view)[0]) for _ in range(800)]
    vflips = sum(r == 1 for r, _ in corners)
    hflips = sum(c == 1 for _, c in corners)
    both = sum(r == 1 and c == 1 for r, c in corners)
    assert 330 < hflips < 470 and 330 < vflips < 470
    assert 140 < both < 260


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8)])
def test_rejects_non_uint8_views(bad):
    with pytest.raises(ValueError, match="uint8"):
        StereoAugment()(bad, bad)


def test_rejects_mismatched_views():
    with pytest.raises(ValueError, match="shape"):
        StereoAugment()(flat_view((8, 8)), flat_view((8, 16)))


def test_bad_probability_rejected():
    with pytest.raises(ValueError, match="aug_prob"):
        StereoAugment(aug_prob=1.5)
