"""The frozen-feature cache (`data/feature_cache.py`): cached tile features equal freshly computed ones, every part
of the key misses when it changes, pre-augmented banks are reproducible, and the path a run takes is planned as
documented. Runs on the cache are in tests/train/test_cached_training.py, evaluation and prediction in
tests/infer/test_cached_prediction.py. Every cache lives in a temporary folder of its own.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_runs import (
    BACKBONE,
    F32,
    GRID,
    IMG,
    bf16,
    spies,
)
from PIL import Image

from biomass5head.cli.train import build_parser, config_from_args
from biomass5head.constants import TARGETS
from biomass5head.data.augment import StereoAugment, hflip_views, vflip_views
from biomass5head.data.datasets import FeatureDataset
from biomass5head.data.feature_cache import (
    FLIP_VARIANTS,
    FeatureCache,
    _variant_views,
    bank_variants,
    ensure_features,
    plan_feature_path,
    state_dict_digest,
)
from biomass5head.data.images import TileSpec, load_views, tile_view, tiles_to_tensor
from biomass5head.data.tables import load_train
from biomass5head.fileio import file_sha256
from biomass5head.model.backbone import create_backbone
from biomass5head.model.five_head import FiveHeadModel
from biomass5head.model.predict import flip_tiles


# --------------------------------------------------------------------------------------------------------------
# Unit level: FeatureCache and ensure_features
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> FiveHeadModel:
    torch.manual_seed(0)
    return FiveHeadModel(create_backbone(BACKBONE, IMG, pretrained=False)).eval()


@pytest.fixture
def photos(tiny_data, tmp_path) -> list[Path]:
    """Copies of three training photos that a test may edit."""
    folder = tmp_path / "photos"
    folder.mkdir()
    return [Path(shutil.copy(p, folder)) for p in sorted((tiny_data / "train").glob("*.jpg"))[:3]]


def make_cache(root, model, *, grid=GRID, img_size=IMG, rt=None, weights=None, aug_key="") -> FeatureCache:
    return FeatureCache(root, backbone=BACKBONE, weights_digest=weights or state_dict_digest(model.backbone),
                        tiles=TileSpec(grid, img_size, *model.mean_std),
                        compute_dtype=(rt or F32).dtype_name, aug_key=aug_key)


def build(root, model, paths, variants=("id",), *, grid=GRID, img_size=IMG, rt=None, weights=None,
          aug_key="", augment=None, seed=0):
    """(cache, table) of ensure_features with the cache keyed as the trainer keys it."""
    rt = rt or F32
    cache = make_cache(root, model, grid=grid, img_size=img_size, rt=rt, weights=weights, aug_key=aug_key)
    table = ensure_features(cache, model, paths, list(variants), tiles=TileSpec(grid, img_size, *model.mean_std),
                            runtime=rt, batch_size=4, augment=augment, seed=seed)
    return cache, table


def pixel_tiles(model, path, variant="id", grid=GRID, img_size=IMG) -> torch.Tensor:
    """(2, T, 3, S, S) normalised tiles of both views; flips applied on the tile tensors as pixel TTA does."""
    mean, std = model.mean_std
    x = torch.stack([tiles_to_tensor(tile_view(v, grid), mean, std) for v in load_views(path, grid, img_size)])
    if variant in ("h", "hv"):
        x = flip_tiles(x, grid, horizontal=True)
    if variant in ("v", "hv"):
        x = flip_tiles(x, grid, horizontal=False)
    return x


@torch.no_grad()
def fresh(model, path, variant="id", rt=None, grid=GRID, img_size=IMG) -> np.ndarray:
    """model.encode of one photo's tiles now: (2, T, D) float32."""
    x = pixel_tiles(model, path, variant, grid, img_size)
    with (rt or F32).autocast():
        feats = model.encode(x.flatten(0, 1))
    return feats.float().reshape(2, x.shape[1], -1).numpy()


def test_state_dict_digest_follows_the_weights_and_accepts_scalar_buffers(model):
    assert state_dict_digest(model.backbone) == state_dict_digest(copy.deepcopy(model.backbone))
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # num_batches_tracked is 0-dim
    before = state_dict_digest(net)
    net[1].num_batches_tracked += 1
    counted = state_dict_digest(net)
    with torch.no_grad():
        net[0].weight[0, 0] += 1e-6
    assert len({before, counted, state_dict_digest(net)}) == 3


def test_flip_variants_of_views_equal_flip_tiles_of_tile_tensors(tiny_data, model):
    """`h`/`v` mirror both views before tiling: the same tensors as engine.flip_tiles (pixel TTA) after tiling."""
    path = sorted((tiny_data / "train").glob("*.jpg"))[0]
    grid = (2, 3)
    views = load_views(path, grid, IMG)
    mean, std = model.mean_std
    as_tensor = lambda lr: torch.stack([tiles_to_tensor(tile_view(v, grid), mean, std) for v in lr])  # noqa: E731
    x = as_tensor(views)
    for variant, expected in (("h", flip_tiles(x, grid, True)), ("v", flip_tiles(x, grid, False)),
                              ("hv", flip_tiles(flip_tiles(x, grid, True), grid, False))):
        got = as_tensor(_variant_views(views, variant, None, 0, "digest"))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(as_tensor(hflip_views(*views)), flip_tiles(x, grid, True))
    assert torch.equal(as_tensor(vflip_views(*views)), flip_tiles(x, grid, False))
    assert not torch.equal(flip_tiles(x, grid, True), x)


def test_cached_features_equal_fresh_encode_float32(model, photos, tmp_path):
    cache, table = build(tmp_path / "cache", model, photos, FLIP_VARIANTS)
    n_tiles = GRID[0] * GRID[1]
    for path in photos:
        for variant in FLIP_VARIANTS:
            feats = table[str(path)][variant]
            assert feats.shape == (2, n_tiles, model.feat_dim) and feats.dtype == np.float32
            np.testing.assert_allclose(feats, fresh(model, path, variant), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(np.load(cache.file(path, variant)), feats)  # what is on disk
        # the variants really are different inputs
        assert not np.allclose(table[str(path)]["id"], table[str(path)]["h"])
        assert not np.allclose(table[str(path)]["id"], table[str(path)]["v"])
    assert json.loads((cache.dir / "key.json").read_text())["dtype"] == "float32"


def test_cached_features_with_bf16_autocast_match_within_bf16_tolerance(model, photos, tmp_path):
    _, table = build(tmp_path / "cache", model, photos, FLIP_VARIANTS, rt=bf16())
    for path in photos:
        for variant in FLIP_VARIANTS:
            cached, exact = table[str(path)][variant], fresh(model, path, variant)
            # bfloat16 keeps 8 significant bits: errors of a few 2^-8 accumulate through the blocks
            np.testing.assert_allclose(cached, exact, rtol=2**-6, atol=2**-6 * np.abs(exact).max())
            assert not np.array_equal(cached, exact)  # autocast did run in bfloat16
            np.testing.assert_allclose(cached, fresh(model, path, variant, rt=bf16()), rtol=1e-3, atol=1e-3)


def test_second_call_reuses_everything_from_disk(model, photos, tmp_path):
    _, first = build(tmp_path / "cache", model, photos, FLIP_VARIANTS)
    twin = Path(shutil.copy(photos[0], tmp_path / "same_bytes_other_name.jpg"))  # content-addressed: a hit
    with spies() as rec:
        cache, again = build(tmp_path / "cache", model, [*photos, twin], FLIP_VARIANTS)  # a new cache object
    assert rec.encodes == 0 and rec.decodes("cache") == []
    assert any(f"reused all {4 * len(FLIP_VARIANTS)} entries" in m for m in rec.log), rec.log
    for path in photos:
        for variant in FLIP_VARIANTS:
            np.testing.assert_array_equal(again[str(path)][variant], first[str(path)][variant])
    np.testing.assert_array_equal(again[str(twin)]["id"], first[str(photos[0])]["id"])
    assert len(list(cache.dir.glob("*.npy"))) == len(photos) * len(FLIP_VARIANTS)


def _one_pixel_changed(path: Path) -> None:
    img = np.array(Image.open(path))
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(path, quality=95)


KEY_CHANGES = ["weights", "img_size", "grid", "variant", "photo_bytes", "compute_dtype", "aug_key"]


@pytest.mark.parametrize("change", KEY_CHANGES)
def test_changing_any_part_of_the_key_misses_the_cache(change, model, photos, tmp_path):
    root, paths = tmp_path / "cache", photos[:2]
    base_cache, base = build(root, model, paths)
    kwargs: dict = {}
    other, computed = model, len(paths)
    if change == "weights":
        other = copy.deepcopy(model)
        with torch.no_grad():
            next(other.backbone.parameters()).view(-1)[0] += 1e-2
        assert state_dict_digest(other.backbone) != state_dict_digest(model.backbone)
    elif change == "img_size":  # the same weights digest, only the tile size differs
        other = FiveHeadModel(create_backbone(BACKBONE, 48, pretrained=False)).eval()
        kwargs = dict(img_size=48, weights=state_dict_digest(model.backbone))
    elif change == "grid":
        kwargs = dict(grid=(1, 2))
    elif change == "variant":
        kwargs = dict(variants=("id", "h"))
    elif change == "photo_bytes":
        before = file_sha256(paths[0])
        _one_pixel_changed(paths[0])
        assert file_sha256(paths[0]) != before
        computed = 1  # the other photo is unchanged: still a hit
    elif change == "compute_dtype":
        kwargs = dict(rt=bf16())
    elif change == "aug_key":
        kwargs = dict(aug_key=json.dumps({"aug_prob": 0.5, "seed": 1}))
    with spies() as rec:
        cache, table = build(root, other, paths, **kwargs)
    entries = len(paths) * len(kwargs.get("variants", ("id",)))
    assert rec.encodes > 0
    assert any(f"reusing {entries - computed} entries, computing {computed}" in m for m in rec.log), rec.log
    if change in ("variant", "photo_bytes"):  # same folder, new file names
        assert cache.dir == base_cache.dir
    else:
        assert cache.dir != base_cache.dir and cache.key != base_cache.key
    variant = "h" if change == "variant" else "id"
    new = cache.file(paths[0], variant)
    assert new.exists() and new != base_cache.file(paths[0], "id")
    if change not in ("aug_key", "grid"):  # a key part that changes the inputs changes the features too
        assert not np.allclose(table[str(paths[0])][variant], base[str(paths[0])]["id"])
    # the original entries are untouched: the original key still hits everything
    if change != "photo_bytes":
        with spies() as rec:
            _, again = build(root, model, paths)
        assert rec.encodes == 0
        np.testing.assert_array_equal(again[str(paths[0])]["id"], base[str(paths[0])]["id"])


# --------------------------------------------------------------------------------------------------------------
# Banks of pre-augmented variants
# --------------------------------------------------------------------------------------------------------------
def _bank(root, model, paths, k=3, seed=0, stereo_correct=False):
    augment = StereoAugment(aug_prob=1.0, stereo_correct=stereo_correct)
    return build(root, model, paths, bank_variants(k), augment=augment, seed=seed, aug_key=f"{seed}:{stereo_correct}")


def test_bank_is_deterministic_per_seed_and_differs_between_k_and_seeds(model, photos, tmp_path):
    paths = photos[:2]
    assert bank_variants(3) == ("aug0", "aug1", "aug2")
    _, a = _bank(tmp_path / "a", model, paths, seed=0)
    _, b = _bank(tmp_path / "b", model, paths, seed=0)  # built independently: the same draws
    _, c = _bank(tmp_path / "c", model, paths, seed=1)
    _, plain = build(tmp_path / "plain", model, paths)
    for path in map(str, paths):
        for v in bank_variants(3):
            np.testing.assert_array_equal(a[path][v], b[path][v])
            assert not np.allclose(a[path][v], c[path][v])
            assert not np.allclose(a[path][v], plain[path]["id"])
        assert not np.allclose(a[path]["aug0"], a[path]["aug1"])
        assert not np.allclose(a[path]["aug1"], a[path]["aug2"])
    # each entry depends on (seed, k, photo) only, not on what else was built with it
    _, alone = _bank(tmp_path / "alone", model, paths[1:], k=3, seed=0)
    np.testing.assert_array_equal(alone[str(paths[1])]["aug2"], a[str(paths[1])]["aug2"])


def test_stereo_correct_bank_entries_differ_between_views(model, tmp_path):
    """A photo whose two halves are identical: shared photometric draws keep the views equal, stereo-correct
    draws (independent per view) make them differ."""
    half = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "twin_halves.png"
    Image.fromarray(np.concatenate([half, half], axis=1)).save(path)
    _, shared = _bank(tmp_path / "shared", model, [path], k=3, stereo_correct=False)
    _, correct = _bank(tmp_path / "correct", model, [path], k=3, stereo_correct=True)
    for v in bank_variants(3):
        np.testing.assert_allclose(shared[str(path)][v][0], shared[str(path)][v][1], rtol=1e-5, atol=1e-5)
        assert not np.allclose(correct[str(path)][v][0], correct[str(path)][v][1], atol=1e-3)
        left, right = _variant_views((half, half), v, StereoAugment(aug_prob=1.0, stereo_correct=True), 0, "d")
        assert not np.array_equal(left, right)


def test_feature_dataset_swaps_views_on_features_and_draws_from_its_variants(tiny_data):
    df = load_train(tiny_data).head(4)
    rng = np.random.default_rng(0)
    table = {p: {v: rng.normal(size=(2, 2, 8)).astype(np.float32) for v in ("id", "aug0", "aug1")}
             for p in df["abs_path"]}
    ds = FeatureDataset(df, table, ["aug0", "aug1"], swap_prob=1.0)
    seen = set()
    for epoch in range(6):
        ds.reseed(epoch)
        item = ds[0]
        feats = {v: table[df["abs_path"][0]][v] for v in ("aug0", "aug1")}
        match = [v for v, f in feats.items() if np.array_equal(item["left_feats"].numpy(), f[1])]
        assert len(match) == 1 and np.array_equal(item["right_feats"].numpy(), feats[match[0]][0])
        seen.add(match[0])
    assert seen == {"aug0", "aug1"}
    item = FeatureDataset(df, table, ["id"])[2]
    np.testing.assert_array_equal(item["left_feats"].numpy(), table[df["abs_path"][2]]["id"][0])
    np.testing.assert_allclose(item["target"].numpy(), df[list(TARGETS)].to_numpy(np.float32)[2])


# --------------------------------------------------------------------------------------------------------------
# The path a run takes
# --------------------------------------------------------------------------------------------------------------
def plan(*args: str):
    return plan_feature_path(config_from_args(build_parser().parse_args(list(args))))


@pytest.mark.parametrize("args, use, variants, words", [
    ((), False, None, "not used"),
    (("--freeze-backbone", "--aug-prob", "0"), True, ("id",), "original photos (--aug-prob 0)"),
    (("--freeze-backbone",), True, bank_variants(4), "bank of 4 pre-augmented variants"),
    (("--freeze-backbone", "--feature-bank", "2", "--stereo-correct-aug"), True, ("aug0", "aug1"),
     "stereo-correct True"),
    (("--freeze-backbone", "--feature-bank", "0"), False, None, "--feature-bank 0"),
    (("--freeze-backbone", "--feature-bank", "0", "--aug-prob", "0"), True, ("id",), "original photos"),
    (("--freeze-backbone", "--mixup-prob", "0.5"), False, None, "MixUp/CutMix"),
    (("--freeze-backbone", "--aug-prob", "0", "--cutmix-prob", "0.5"), False, None, "MixUp/CutMix"),
    (("--freeze-backbone", "--aug-prob", "0", "--no-feature-cache"), False, None, "--no-feature-cache"),
    (("--two-stage", "--aug-prob", "0"), True, ("id",), "on for stage 1"),
    (("--two-stage",), True, bank_variants(4), "on for stage 1: a bank of 4"),
])
def test_plan_feature_path(args, use, variants, words):
    p = plan(*args)
    assert p.use is use
    if use:
        assert p.variants == variants
        assert bool(p.aug_key) == variants[0].startswith("aug")
    assert words in p.message and p.message.startswith("feature cache:")


def test_bank_key_changes_with_seed_and_augmentation():
    keys = {plan("--freeze-backbone").aug_key, plan("--freeze-backbone", "--seed", "3").aug_key,
            plan("--freeze-backbone", "--aug-prob", "0.3").aug_key,
            plan("--freeze-backbone", "--stereo-correct-aug").aug_key}
    assert len(keys) == 4


def test_a_corrupt_entry_is_recomputed_not_read(model, photos, tmp_path, caplog):
    cache, table = build(tmp_path / "cache", model, photos[:2])
    damaged = cache.file(photos[0], "id")
    damaged.write_bytes(damaged.read_bytes()[:40])  # a half-written entry, e.g. from a killed process
    with caplog.at_level(logging.WARNING), spies() as rec:
        _, again = build(tmp_path / "cache", model, photos[:2])
    assert f"unreadable entry {damaged}, recomputing" in caplog.text and rec.encodes > 0
    np.testing.assert_array_equal(again[str(photos[0])]["id"], table[str(photos[0])]["id"])
    np.testing.assert_array_equal(np.load(damaged), table[str(photos[0])]["id"])  # rewritten whole
