"""Augmentation and MixUp/CutMix options as FoldTrainer wires them."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from spied_run import (
    Run,
)

from biomass5head.data.datasets import BiomassDataset


def test_augmentation_options_reach_the_training_dataset(default_run, stereo_run):
    assert stereo_run.rc == 0
    aug = stereo_run.trainers[0].train_loader.dataset.augment
    assert (aug.aug_prob, aug.stereo_correct, aug.swap_prob) == (1.0, True, 0.3)
    aug = default_run.trainers[0].train_loader.dataset.augment
    assert (aug.aug_prob, aug.stereo_correct, aug.swap_prob) == (0.5, False, 0.0)
    for run in (default_run, stereo_run):  # validation is never augmented or mixed
        val = run.trainers[0].val_loader.dataset
        assert val.augment is None and val.mixer is None
    assert default_run.trainers[0].train_loader.dataset.mixer is None  # mixing off by default


def _marked_view(size: int = 32, background: int = 90) -> np.ndarray:
    """A textured uint8 view with a bright square near the top-left corner (to see flips and rotations)."""
    rng = np.random.default_rng(0)
    view = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    view[3:11, 4:12] = 250
    return view


def _centroid(tiles: torch.Tensor) -> np.ndarray:
    """Centre of the brightest pixels of a one-tile view tensor (1, 3, S, S), normalised or not."""
    img = tiles[0].mean(0).numpy()
    ys, xs = np.nonzero(img > img.min() + 0.6 * (img.max() - img.min()))
    return np.array([ys.mean(), xs.mean()])


@contextmanager
def photos(run: Run, left: np.ndarray, right: np.ndarray):
    """The run's training dataset, with every photo replaced by the given views (restored afterwards)."""
    ds = run.trainers[0].train_loader.dataset
    saved = ds.image_cache
    ds.image_cache = {p: (left, right) for p in ds.paths}
    try:
        yield ds
    finally:
        ds.image_cache = saved


def test_stereo_correct_aug_shares_geometry_but_not_photometry(stereo_run):
    view = _marked_view()
    with photos(stereo_run, view, view.copy()) as ds:
        items = [ds[i % len(ds)] for i in range(40)]
    centroids = []
    for item in items:
        left, right = item["left"], item["right"]
        assert not torch.equal(left, right)  # brightness, colour, noise drawn per view
        cl, cr = _centroid(left), _centroid(right)
        assert np.abs(cl - cr).max() < 2.0  # the same flip / rotation / affine on both views
        centroids.append(cl)
    quadrants = {(c[0] > 16, c[1] > 16) for c in centroids}
    assert len(quadrants) >= 3  # the geometry really changes between draws
    brightness = [abs(float(i["left"].mean() - i["right"].mean())) for i in items]
    assert np.mean(brightness) > 0.02


def test_without_stereo_correct_aug_both_views_get_identical_augmentation(default_run):
    view = _marked_view()
    with photos(default_run, view, view.copy()) as ds:
        items = [ds[i % len(ds)] for i in range(40)]
        untouched = BiomassDataset(pd.DataFrame({"abs_path": ds.paths}), ds.tiles,
                                   image_cache=ds.image_cache)[0]["left"]
    changed = 0
    for item in items:
        assert torch.equal(item["left"], item["right"])
        changed += not torch.equal(item["left"], untouched)
    assert changed >= len(items) // 4  # aug-prob 0.5 does change the views


def _swaps(run: Run, n: int) -> int:
    """How many of n training items come out with the bright right view on the left."""
    with photos(run, _marked_view(background=40), _marked_view(background=200)) as ds:
        items = [ds[i % len(ds)] for i in range(n)]
    return sum(float(item["left"].mean()) > float(item["right"].mean()) for item in items)


def test_stereo_swap_prob_swaps_left_and_right(default_run, stereo_run):
    assert _swaps(default_run, n=60) == 0
    swaps = _swaps(stereo_run, n=120)
    assert 15 <= swaps <= 60  # about 0.3 of 120 draws


def test_mixing_options_reach_the_mixer(mix_run):
    assert mix_run.rc == 0
    mixer = mix_run.trainers[0].train_loader.dataset.mixer
    assert (mixer.mixup_prob, mixer.mixup_alpha, mixer.cutmix_prob, mixer.cutmix_alpha) == (0.5, 0.3, 0.25, 0.7)


def test_mixing_partners_share_species_month_and_state(mix_run):
    trainer = mix_run.trainers[0]
    ds, df = trainer.train_loader.dataset, trainer.train_df
    partners = ds.mixer.partners
    keys = list(zip(df["Species"], df["month"], df["State"], strict=True))
    for i, js in enumerate(partners):  # exactly the other training images of the same context
        assert sorted(js) == [j for j in range(len(df)) if j != i and keys[j] == keys[i]]
    assert sum(len(js) > 0 for js in partners) >= 4
    loaded: list[int] = []
    load = ds.load
    ds.load = lambda j: (loaded.append(j), load(j))[1]
    try:
        mixed = _check_mixed_items(ds, keys, loaded)
    finally:
        del ds.load
    assert mixed > 0


def _check_mixed_items(ds: BiomassDataset, keys: list[tuple], loaded: list[int]) -> int:
    """Draw every item four times; each mix must use a partner of the same context and mix the targets linearly.
    Returns the number of mixed items."""
    mixed = 0
    for _ in range(4):
        for i in range(len(ds)):
            loaded.clear()
            target = ds[i]["target"].numpy().astype(np.float64)
            own = ds.targets[i].astype(np.float64)
            if len(loaded) == 1:  # not mixed: the image's own targets
                assert loaded == [i] and np.allclose(target, own)
                continue
            assert loaded[0] == i and len(loaded) == 2
            j = loaded[1]
            assert keys[j] == keys[i] and j != i
            other = ds.targets[j].astype(np.float64)
            lam = np.dot(target - other, own - other) / max(np.dot(own - other, own - other), 1e-12)
            assert -1e-6 <= lam <= 1 + 1e-6 and np.allclose(target, lam * own + (1 - lam) * other, atol=1e-3)
            mixed += 1
    return mixed
