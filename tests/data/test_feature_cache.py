"""The frozen-feature cache (`src.feature_cache`): cached tile features equal freshly computed ones, every part of
the key misses when it changes, pre-augmented banks are reproducible, and runs, evaluation and prediction take the
cached path where the backbone is frozen (and say so in the log).

Models use timm's `test_vit` (random initialisation, patch 16, D = 64) on 32 px tiles so that everything runs in
seconds on a CPU. Every cache lives in a temporary folder of its own (`--feature-cache DIR` for runs).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import biomass5head.data.datasets
import biomass5head.data.feature_cache
import biomass5head.model.five_head
import biomass5head.model.predict
import biomass5head.train.engine
import biomass5head.train.trainer
from biomass5head.cli import eval as eval_5head_oof
from biomass5head.cli import predict as predict_cli
from biomass5head.cli import train as train_5head
from biomass5head.cli.train import build_parser, config_from_args
from biomass5head.constants import TARGETS
from biomass5head.data.augment import StereoAugment, hflip_views, vflip_views
from biomass5head.data.datasets import BiomassDataset, FeatureDataset
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
from biomass5head.device import Precision, Runtime
from biomass5head.fileio import file_sha256
from biomass5head.infer import run as inference
from biomass5head.infer.oof import read_run_folds
from biomass5head.infer.predict import finish, predict_from_cache
from biomass5head.model.backbone import create_backbone
from biomass5head.model.five_head import FiveHeadModel
from biomass5head.model.predict import flip_tiles

BACKBONE = "test_vit"
IMG = 32
GRID = (2, 2)  # several tiles per view, so that a flip must also mirror the tile order
CPU = torch.device("cpu")
PRED_COLS = [f"pred_{t}" for t in TARGETS]
RUN_ARGS = ["--backbone", BACKBONE, "--img-size", str(IMG), "--grid", "1", "2", "--batch-size", "4",
            "--num-workers", "0", "--device-type", "cpu", "--amp-dtype", "float32", "--epochs", "1",
            "--train-folds", "0"]


F32 = Runtime(CPU, Precision("float32", None, "tests"), 0)


def bf16() -> Runtime:
    """A CPU runtime that computes in bfloat16 autocast (the tensors here are small enough for any CPU)."""
    return Runtime(CPU, Precision("bfloat16", torch.bfloat16, "tests"), 0)


# --------------------------------------------------------------------------------------------------------------
# Spies
# --------------------------------------------------------------------------------------------------------------
class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@dataclass
class Record:
    """What happened inside a `spies()` block."""
    log: list[str] = field(default_factory=list)
    events: list[tuple] = field(default_factory=list)  # ("epoch", n), ("pixels", path), ("cache", path) in order
    batches: list[dict] = field(default_factory=list)  # per forward_batch: training, on features, epoch
    datasets: list = field(default_factory=list)  # per training epoch: the train loader's dataset
    encodes: int = 0  # FiveHeadModel.encode calls (backbone passes)
    epoch: int = -1

    @property
    def text(self) -> str:
        return "\n".join(self.log)

    def decodes(self, kind: str) -> list[str]:
        return [e[1] for e in self.events if e[0] == kind]

    def train_batches(self, epoch: int | None = None) -> list[dict]:
        return [b for b in self.batches if b["training"] and epoch in (None, b["epoch"])]


@contextlib.contextmanager
def spies():
    """Record backbone passes, photo decodes (pixel datasets vs cache builds), batches, epochs and `src` logs."""
    rec = Record()
    handler = _ListHandler()
    src_logger = logging.getLogger("biomass5head")
    old_level = src_logger.level
    src_logger.setLevel(logging.INFO)
    src_logger.addHandler(handler)
    encode = biomass5head.model.five_head.FiveHeadModel.encode
    forward_batch = biomass5head.model.predict.forward_batch
    train_one_epoch = biomass5head.train.trainer.train_one_epoch

    def spy_encode(self, x):
        rec.encodes += 1
        return encode(self, x)

    def spy_forward_batch(model, batch, *a, **kw):
        rec.batches.append({"training": model.training, "feats": "left_feats" in batch, "pixels": "left" in batch,
                            "epoch": rec.epoch})
        return forward_batch(model, batch, *a, **kw)

    def spy_train_one_epoch(model, loader, *a, **kw):
        rec.epoch = kw.get("epoch", rec.epoch + 1)
        rec.events.append(("epoch", rec.epoch))
        rec.datasets.append(loader.dataset)
        return train_one_epoch(model, loader, *a, **kw)

    def decoder(kind, original):
        def spy(path, grid, img_size):
            rec.events.append((kind, str(path)))
            return original(path, grid, img_size)
        return spy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(biomass5head.model.five_head.FiveHeadModel, "encode", spy_encode)
        mp.setattr(biomass5head.train.engine, "forward_batch", spy_forward_batch)
        mp.setattr(biomass5head.model.predict, "forward_batch", spy_forward_batch)
        mp.setattr(biomass5head.train.trainer, "train_one_epoch", spy_train_one_epoch)
        mp.setattr(biomass5head.data.datasets, "load_views", decoder("pixels", load_views))
        mp.setattr(biomass5head.data.feature_cache, "load_views", decoder("cache", load_views))
        try:
            yield rec
        finally:
            src_logger.removeHandler(handler)
            src_logger.setLevel(old_level)
            rec.log = handler.messages


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


def make_cache(root, model, *, grid=GRID, img_size=IMG, autocast=None, weights=None, aug_key="") -> FeatureCache:
    return FeatureCache(root, backbone=BACKBONE, weights_digest=weights or state_dict_digest(model.backbone),
                        tiles=TileSpec(grid, img_size, *model.mean_std),
                        compute_dtype=(autocast or F32).dtype_name, aug_key=aug_key)


def build(root, model, paths, variants=("id",), *, grid=GRID, img_size=IMG, autocast=None, weights=None,
          aug_key="", augment=None, seed=0):
    """(cache, table) of ensure_features with the cache keyed as the trainer keys it."""
    autocast = autocast or F32
    cache = make_cache(root, model, grid=grid, img_size=img_size, autocast=autocast, weights=weights, aug_key=aug_key)
    table = ensure_features(cache, model, paths, list(variants), tiles=TileSpec(grid, img_size, *model.mean_std),
                            runtime=autocast, batch_size=4, augment=augment, seed=seed)
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
def fresh(model, path, variant="id", autocast=None, grid=GRID, img_size=IMG) -> np.ndarray:
    """model.encode of one photo's tiles now: (2, T, D) float32."""
    x = pixel_tiles(model, path, variant, grid, img_size)
    with (autocast or F32).autocast():
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
    _, table = build(tmp_path / "cache", model, photos, FLIP_VARIANTS, autocast=bf16())
    for path in photos:
        for variant in FLIP_VARIANTS:
            cached, exact = table[str(path)][variant], fresh(model, path, variant)
            # bfloat16 keeps 8 significant bits: errors of a few 2^-8 accumulate through the blocks
            np.testing.assert_allclose(cached, exact, rtol=2**-6, atol=2**-6 * np.abs(exact).max())
            assert not np.array_equal(cached, exact)  # autocast did run in bfloat16
            np.testing.assert_allclose(cached, fresh(model, path, variant, autocast=bf16()), rtol=1e-3, atol=1e-3)


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
        kwargs = dict(autocast=bf16())
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


# --------------------------------------------------------------------------------------------------------------
# Runs, evaluation and prediction
# --------------------------------------------------------------------------------------------------------------
def train(data: Path, out: Path, cache_dir: Path, *args: str) -> Record:
    argv = ["--base-path", str(data), *RUN_ARGS, "--output-dir", str(out), "--feature-cache", str(cache_dir), *args]
    if "--backbone-weights" not in args:
        argv.append("--no-pretrained")
    with spies() as rec:
        assert train_5head.main(argv) == 0
    return rec


def npy_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.npy")) if folder.exists() else []


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """test_vit weights that every fold and re-run loads (random initialisation differs per fold seed)."""
    torch.manual_seed(1234)
    state = {k: v.contiguous() for k, v in create_backbone(BACKBONE, IMG, pretrained=False).state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file(state, path)
    return path


@dataclass
class HeadOnly:
    first: Record
    rerun: Record
    out: Path
    cache: Path


@pytest.fixture(scope="module")
def head_only(tiny_data, tmp_path_factory, weights_file) -> HeadOnly:
    """A head-only run of folds 0 and 1 with --aug-prob 0, then a re-run into a new folder with the same cache."""
    base = tmp_path_factory.mktemp("head_only")
    args = ("--freeze-backbone", "--aug-prob", "0", "--train-folds", "0", "1", "--backbone-weights", str(weights_file))
    first = train(tiny_data, base / "run", base / "cache", *args)
    rerun = train(tiny_data, base / "rerun", base / "cache", *args)
    return HeadOnly(first, rerun, base / "run", base / "cache")


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
    (("--freeze-backbone", "--feature-bank", "0"), "feature cache: off (--feature-bank 0 with --aug-prob > 0)"),
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


def evaluate(run_dir: Path, *args: str) -> tuple[pd.DataFrame, Record]:
    with spies() as rec:
        assert eval_5head_oof.main(["--model-dir", str(run_dir), *args]) == 0
    return pd.read_csv(run_dir / "oof_predictions.csv"), rec


def test_eval_reuses_the_runs_cache_and_matches_pixels(head_only):
    cached, rec = evaluate(head_only.out)  # the run's --feature-cache folder, from config.json
    assert rec.encodes == 0 and rec.decodes("pixels") == [] and rec.decodes("cache") == []
    assert sum("reused all" in m for m in rec.log) == 2  # folds 0 and 1
    pixels, rec = evaluate(head_only.out, "--no-feature-cache")
    assert rec.decodes("cache") == [] and len(rec.decodes("pixels")) == len(pixels)
    assert cached["sample_id_prefix"].tolist() == pixels["sample_id_prefix"].tolist()
    np.testing.assert_allclose(cached[PRED_COLS].to_numpy(), pixels[PRED_COLS].to_numpy(), rtol=1e-4, atol=1e-5)
    # the run trained in float32 (--amp-dtype float32): tight; bfloat16 tolerance would be ~1e-2 relative


def test_eval_tta_with_the_cache_averages_id_h_v(head_only, tiny_data, tmp_path):
    cache = tmp_path / "cache"
    plain, _ = evaluate(head_only.out, "--feature-cache", str(cache))
    tta, rec = evaluate(head_only.out, "--tta", "--feature-cache", str(cache))
    n = len(tta)
    # per fold: the id entries of the plain evaluation are reused, h and v are computed now
    assert rec.encodes > 0 and rec.decodes("pixels") == []
    sizes = tta["fold"].value_counts()
    for k in sizes:
        assert any(f"reusing {k} entries, computing {2 * k}" in m for m in rec.log), rec.log
    names = [f.name.rsplit("_", 1)[1] for f in npy_files(cache)]
    assert sorted(set(names)) == ["h.npy", "id.npy", "v.npy"] and len(names) == 3 * n
    pixels, _ = evaluate(head_only.out, "--tta", "--no-feature-cache")
    np.testing.assert_allclose(tta[PRED_COLS].to_numpy(), pixels[PRED_COLS].to_numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(tta[PRED_COLS].to_numpy(), plain[PRED_COLS].to_numpy(), rtol=1e-6, atol=0)
    # fold 0's rows: the mean in grams of the three variants' predictions, then the run's post-processing
    run = inference.open_run(head_only.out)
    opts = inference.resolve_options(run, {"feature_cache": str(cache)})
    rt = inference.runtime(opts)
    df = load_train(tiny_data)
    rows = df[read_run_folds(run, df, None) == 0].reset_index(drop=True)
    fm = inference.load_fold_model(run.checkpoints[0], opts, rt.device)
    fc = FeatureCache(cache, backbone=opts.cfg.model.backbone, weights_digest=state_dict_digest(fm.model.backbone),
                      tiles=fm.tiles(opts), compute_dtype=rt.dtype_name)
    with spies() as rec:
        per_variant = [predict_from_cache(fm, rows, fc, opts, rt, variants=[v])["pred"] for v in ("id", "h", "v")]
    assert rec.encodes == 0
    expected = finish(np.mean(per_variant, axis=0), opts)
    np.testing.assert_allclose(tta.loc[tta["fold"] == 0, PRED_COLS].to_numpy(), expected, rtol=1e-6, atol=1e-6)


def test_predict_with_the_cache_matches_pixels_and_reuses_it(head_only, tiny_data, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model-dir", str(head_only.out), "--feature-cache", str(cache), "--out"]
    with spies() as rec:
        assert predict_cli.main([*args, str(tmp_path / "cached.csv")]) == 0
    # 4 test photos: computed with fold 0's model, reused by fold 1's (same frozen backbone)
    assert any("reusing 0 entries, computing 4" in m for m in rec.log) and any("reused all 4" in m for m in rec.log)
    assert len(npy_files(cache)) == 4
    with spies() as rec:
        assert predict_cli.main([*args, str(tmp_path / "again.csv")]) == 0
    assert rec.encodes == 0 and rec.decodes("cache") == [] and rec.decodes("pixels") == []
    with spies() as rec:
        assert predict_cli.main(["--model-dir", str(head_only.out), "--no-feature-cache", "--out",
                                 str(tmp_path / "pixels.csv")]) == 0
    assert rec.decodes("cache") == [] and rec.decodes("pixels")
    cached, again, pixels = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("cached", "again", "pixels"))
    assert cached["sample_id"].tolist() == pixels["sample_id"].tolist()
    np.testing.assert_array_equal(cached["target"], again["target"])
    np.testing.assert_allclose(cached["target"], pixels["target"], rtol=1e-4, atol=1e-5)
