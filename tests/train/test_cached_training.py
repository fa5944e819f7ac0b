"""Training runs on the frozen-feature cache: head-only runs train on cached features and reuse them across folds and
re-runs; uncached runs train on pixels; two-stage runs use a feature bank in stage 1 and pixels in stage 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cache_runs import (
    npy_files,
    train,
)

from biomass5head.data.datasets import BiomassDataset, FeatureDataset


def test_head_only_run_trains_on_cached_features_without_decoding_photos_again(head_only):
    rec = head_only.first
    assert "feature cache: on for all epochs: original photos (--aug-prob 0); left/right swap applied on features" \
        in rec.log
    # built once: 30 photos x variant id, in the --feature-cache folder; one key folder
    files = npy_files(head_only.cache)
    assert len(files) == 30 and all(f.name.endswith("_id.npy") for f in files)
    assert len({f.parent for f in files}) == 1 and (files[0].parent / "key.json").is_file()
    assert any("reusing 0 entries, computing 30" in m for m in rec.log)
    # every photo decoded exactly once, by the cache build, before the first epoch; never by a pixel dataset
    cache_decodes = rec.decodes("cache")
    assert sorted(cache_decodes) == sorted(set(cache_decodes)) and len(cache_decodes) == 30
    assert rec.decodes("pixels") == []
    first_epoch = rec.events.index(("epoch", 0))
    assert all(e[0] == "epoch" for e in rec.events[first_epoch:])
    # training and validation batches carry features, never pixels
    assert rec.train_batches() and all(b["feats"] and not b["pixels"] for b in rec.batches)
    assert all(isinstance(ds, FeatureDataset) and ds.variants == ["id"] for ds in rec.datasets)


def test_second_fold_and_rerun_reuse_the_cache_from_disk(head_only):
    first, rerun = head_only.first, head_only.rerun
    # fold 1 sees the same 30 photos with the same frozen weights: nothing is computed again
    assert sum("reused all 30 entries" in m for m in first.log) == 1
    assert first.encodes > 0
    assert sum("reused all 30 entries" in m for m in rerun.log) == 2  # both folds of the re-run
    assert not any("computing" in m for m in rerun.log)
    assert rerun.encodes == 0 and rerun.events == [("epoch", 0), ("epoch", 0)]  # no decode at all
    assert len(npy_files(head_only.cache)) == 30
    # a re-run from the same cache trains the same model
    a = torch.load(head_only.out / "5head_best_fold0.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(head_only.out.parent / "rerun" / "5head_best_fold0.pth", map_location="cpu", weights_only=True)
    for k, v in a.items():
        torch.testing.assert_close(b["model"][k], v)


@pytest.mark.parametrize("args, words", [
    (("--freeze-backbone", "--aug-prob", "0", "--no-feature-cache"), "feature cache: off (--no-feature-cache)"),
    (("--freeze-backbone", "--aug-prob", "0", "--cutmix-prob", "1"), "feature cache: off: MixUp/CutMix"),
    (("--freeze-backbone", "--feature-bank", "0"), "feature cache: off (--feature-bank 0 with augmentation on)"),
    ((), "feature cache: not used (the backbone trains from the first epoch)"),
], ids=["no-feature-cache", "cutmix", "bank0", "single-stage"])
def test_uncached_runs_train_on_pixels_and_leave_the_cache_folder_empty(args, words, tiny_data, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    rec = train(tiny_data, tmp_path / "run", cache, *args)
    assert any(m.startswith(words) for m in rec.log), [m for m in rec.log if "feature cache" in m]
    assert list(cache.iterdir()) == []
    assert rec.train_batches() and all(b["pixels"] and not b["feats"] for b in rec.batches)
    assert all(isinstance(ds, BiomassDataset) for ds in rec.datasets)
    assert rec.decodes("cache") == [] and rec.decodes("pixels")


def test_two_stage_run_uses_a_feature_bank_in_stage_1_and_pixels_in_stage_2(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    rec = train(tiny_data, tmp_path / "run", cache, "--two-stage", "--epochs", "2", "--freeze-epochs", "1",
                "--warmup-epochs", "0", "--feature-bank", "2", "--stereo-swap-prob", "0.5")
    assert any(m.startswith("feature cache: on for stage 1: a bank of 2 pre-augmented variants") for m in rec.log)
    assert all(b["feats"] for b in rec.batches if b["epoch"] == 0)  # stage 1: train and val on features
    assert all(b["pixels"] for b in rec.batches if b["epoch"] == 1)  # stage 2: the backbone trains on pixels
    assert rec.train_batches(0) and rec.train_batches(1)
    stage1, stage2 = rec.datasets
    assert isinstance(stage1, FeatureDataset) and stage1.variants == ["aug0", "aug1"] and stage1.swap_prob == 0.5
    assert isinstance(stage2, BiomassDataset)
    # bank: 24 training photos x 2 draws under an augmentation key; originals: the 6 validation photos
    by_folder = {}
    for f in npy_files(cache):
        by_folder.setdefault(f.parent, []).append(f.name.rsplit("_", 1)[1])
    assert sorted(sorted(set(v)) + [len(v)] for v in by_folder.values()) == [["aug0.npy", "aug1.npy", 48],
                                                                           ["id.npy", 6]]
    bank_dir = next(d for d, v in by_folder.items() if "aug0.npy" in v)
    assert json.loads(json.loads((bank_dir / "key.json").read_text())["aug"])["seed"] == 18
    # cache builds happen before stage 1; pixel decodes only from stage 2 on
    first = rec.events.index(("epoch", 0))
    assert {e[0] for e in rec.events[:first]} == {"cache"} and len({e[1] for e in rec.events[:first]}) == 30
    assert rec.events.index(("epoch", 1)) < next(i for i, e in enumerate(rec.events) if e[0] == "pixels")


def test_scale_augmentation_of_a_frozen_run_goes_into_the_feature_bank(tiny_data, tmp_path):
    """--scale-aug-prob with --aug-prob 0: a bank of zoomed variants (their features differ from the originals'),
    stored under a key that names the zoom; validation stays on the original photos."""
    cache = tmp_path / "cache"
    rec = train(tiny_data, tmp_path / "run", cache, "--freeze-backbone", "--aug-prob", "0", "--scale-aug-prob", "1",
                "--scale-range", "0.5", "0.7", "--scale-pad", "grey", "--feature-bank", "2", "--train-folds", "0")
    assert any("a bank of 2 pre-augmented variants" in m and "--scale-aug-prob 1.0 range 0.5-0.7 pad grey" in m
               for m in rec.log)
    (train_ds,) = rec.datasets  # one epoch
    assert isinstance(train_ds, FeatureDataset) and train_ds.variants == ["aug0", "aug1"]
    keys = {d: json.loads((d / "key.json").read_text())["aug"] for d in cache.iterdir() if d.is_dir()}
    (bank,) = [d for d, aug in keys.items() if aug]  # beside it the originals, for validation
    key = json.loads(keys[bank])
    assert key["scale_prob"] == 1.0 and key["scale_range"] == [0.5, 0.7] and key["scale_pad"] == "grey"
    files = sorted(bank.glob("*.npy"))
    assert len(files) == 24 * 2 and {f.stem.rsplit("_", 1)[1] for f in files} == {"aug0", "aug1"}
    (original,) = [d for d in keys if d != bank]
    for digest in {f.stem.rsplit("_", 1)[0] for f in files}:
        aug0, aug1 = (np.load(bank / f"{digest}_{v}.npy") for v in ("aug0", "aug1"))
        assert not np.allclose(aug0, aug1)  # two different zooms of the photo
        assert not (original / f"{digest}_id.npy").exists()  # training photos are only read zoomed


def test_light_augmentation_of_a_frozen_run_goes_into_the_feature_bank(tiny_data, tmp_path):
    """--light-aug-prob with --aug-prob 0: a bank of shadowed and tinted variants under a key that names the light."""
    cache = tmp_path / "cache"
    rec = train(tiny_data, tmp_path / "run", cache, "--freeze-backbone", "--aug-prob", "0", "--light-aug-prob", "1",
                "--feature-bank", "2", "--train-folds", "0")
    assert any("a bank of 2 pre-augmented variants" in m and "--light-aug-prob 1.0" in m for m in rec.log)
    (train_ds,) = rec.datasets
    assert isinstance(train_ds, FeatureDataset) and train_ds.variants == ["aug0", "aug1"]
    keys = {d: json.loads((d / "key.json").read_text())["aug"] for d in cache.iterdir() if d.is_dir()}
    (bank,) = [d for d, aug in keys.items() if aug]
    assert json.loads(keys[bank])["light_prob"] == 1.0
    files = sorted(bank.glob("*.npy"))
    assert len(files) == 24 * 2
    for digest in {f.stem.rsplit("_", 1)[0] for f in files}:
        aug0, aug1 = (np.load(bank / f"{digest}_{v}.npy") for v in ("aug0", "aug1"))
        assert not np.allclose(aug0, aug1)  # two different shadows and tints of the photo
