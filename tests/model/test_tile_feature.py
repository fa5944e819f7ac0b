"""--tile-feature: what each tile gives FiLM and pooling (the CLS token, the mean of its patch tokens, or both), and
that the frozen-feature cache keeps each kind apart."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biomass5head.data.feature_cache import FeatureCache
from biomass5head.data.images import TileSpec
from biomass5head.model.backbone import create_backbone
from biomass5head.model.five_head import FiveHeadModel

NAME = "vit_small_patch14_reg4_dinov2.lvd142m"  # 4 registers: the patch mean must skip 5 prefix tokens


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone(NAME, 28, pretrained=False).eval()


def test_each_kind_is_what_it_says(backbone):
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        tokens = backbone.forward_features(x)  # (3, 5 + 4, 384)
        cls = FiveHeadModel(backbone, tile_feature="cls").eval().encode(x)
        patch = FiveHeadModel(backbone, tile_feature="patch_mean").eval().encode(x)
        both_model = FiveHeadModel(backbone, tile_feature="cls_patch_mean").eval()
        both = both_model.encode(x)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patch, tokens[:, 5:].mean(1))
    assert not torch.allclose(patch, tokens[:, 1:].mean(1))  # registers are not patches
    torch.testing.assert_close(both, torch.cat([cls, patch], dim=-1))
    assert both_model.feat_dim == 768 and both_model.proj[1].in_features == 2 * 768
    out = both_model(torch.randn(2, 4, 3, 28, 28), torch.randn(2, 4, 3, 28, 28))
    assert out["reg"].shape == (2, 5)


def test_unknown_kind_is_refused(backbone):
    with pytest.raises(ValueError, match="--tile-feature must be"):
        FiveHeadModel(backbone, tile_feature="mean")


def test_the_cache_keeps_kinds_apart_and_cls_keys_stay_as_before(tmp_path):
    tiles = TileSpec((2, 2), 28, (0.5,) * 3, (0.5,) * 3)
    kw = dict(backbone=NAME, weights_digest="abc", tiles=tiles, compute_dtype="float32")
    dirs = {f: FeatureCache(tmp_path, **kw, tile_feature=f).dir for f in ("cls", "patch_mean", "cls_patch_mean")}
    assert len(set(dirs.values())) == 3
    assert FeatureCache(tmp_path, **kw).dir == dirs["cls"]  # caches written before the option are still found


def test_a_run_trains_evaluates_and_caches_both_halves(tiny_data, tmp_path):
    import biomass5head.cli.eval
    import biomass5head.cli.train

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert biomass5head.cli.train.main([
        "--base-path", str(tiny_data), "--output-dir", str(run), "--backbone", "test_vit", "--no-pretrained",
        "--img-size", "32", "--grid", "1", "1", "--batch-size", "4", "--epochs", "1", "--train-folds", "0",
        "--freeze-backbone", "--aug-prob", "0", "--feature-cache", str(cache), "--tile-feature", "cls_patch_mean",
        "--num-workers", "0", "--device-type", "cpu", "--amp-dtype", "float32"]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["tile_feature"] == "cls_patch_mean"
    (folder,) = [d for d in cache.iterdir() if d.is_dir()]
    assert json.loads((folder / "key.json").read_text())["tile_feature"] == "cls_patch_mean"
    feats = np.load(next(folder.glob("*_id.npy")))
    assert feats.shape == (2, 1, 2 * 64)  # both views, one tile, CLS and patch mean of test_vit's 64
    assert biomass5head.cli.eval.main(["--model-dir", str(run), "--num-workers", "0", "--device", "cpu"]) == 0
    assert json.loads((run / "oof_metrics.json").read_text())["n_images"] > 0
