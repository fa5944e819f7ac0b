"""DINOv3 backbones (timm's Eva with RoPE, patch 16, 4 registers): weights in timm's and in Meta's original layout
load strictly and equal, --img-size is checked against the model's patch, and a run trains, evaluates, predicts
and reports end to end on a CPU (random weights: no DINOv3 file is reachable here, so this shows the mechanics)."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from biomass5head.model.backbone import create_backbone

DINOV3 = "vit_small_patch16_dinov3.lvd1689m"


def to_meta_layout(state: dict) -> dict:
    """timm's DINOv3 keys as Meta's original checkpoint names them: the inverse of timm's own checkpoint filter
    (timm.models.eva.checkpoint_filter_fn), plus the pretraining-only tensors a Meta file also holds."""
    meta = {}
    for k, v in state.items():
        if k.endswith("attn.v_bias"):
            continue
        if k.endswith("attn.q_bias"):  # Meta keeps one qkv bias; the k part is fixed at zero
            meta[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v),
                                                               state[k.replace("q_bias", "v_bias")]])
            continue
        meta[k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
             .replace("reg_token", "storage_tokens")] = v.contiguous()
    dim = state["cls_token"].shape[-1]
    meta["mask_token"] = torch.zeros(1, dim)
    meta["rope_embed.periods"] = torch.arange(1, dim // 16 + 1, dtype=torch.float32)
    return meta


@pytest.mark.parametrize("name", [DINOV3, "vit_small_patch16_dinov3_qkvb.lvd1689m"])
@pytest.mark.parametrize("layout", ["timm", "meta"])
def test_weights_load_strictly_in_both_layouts(name, layout, tmp_path):
    torch.manual_seed(0)
    state = create_backbone(name, 32, pretrained=False).state_dict()
    assert any(k.startswith("blocks.0.gamma_1") for k in state) and "reg_token" in state
    file = tmp_path / f"{layout}.safetensors"
    save_file(to_meta_layout(state) if layout == "meta" else {k: v.contiguous() for k, v in state.items()}, file)
    if layout == "meta":
        assert "storage_tokens" in to_meta_layout(state) and "reg_token" not in to_meta_layout(state)
    loaded = create_backbone(name, 32, pretrained=False, weights_path=file).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_meta_file_with_a_key_too_many_is_refused(tmp_path):
    state = create_backbone(DINOV3, 32, pretrained=False).state_dict()
    meta = to_meta_layout(state)
    meta["blocks.0.attn.extra.weight"] = torch.zeros(2, 2)
    save_file(meta, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="do not fit --backbone"):
        create_backbone(DINOV3, 32, pretrained=False, weights_path=tmp_path / "bad.safetensors")


def test_img_size_is_checked_against_patch_16():
    with pytest.raises(ValueError, match="--img-size 28 must be a positive multiple of the patch size 16 .* e.g. 32"):
        create_backbone(DINOV3, 28, pretrained=False)


def test_rope_backbone_has_no_position_embedding_to_resample():
    model = create_backbone(DINOV3, 32, pretrained=False)
    assert getattr(model, "pos_embed", None) is None and model.num_prefix_tokens == 5  # CLS + 4 registers
    out = create_backbone(DINOV3, 64, pretrained=False).forward_features(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 5 + 16, 384)


@pytest.mark.slow
def test_train_eval_predict_report_end_to_end(tiny_data, tmp_path):
    import biomass5head.cli.eval
    import biomass5head.cli.predict
    import biomass5head.cli.report
    import biomass5head.cli.train

    run = tmp_path / "run"
    common = ["--num-workers", "0", "--device", "cpu"]
    assert biomass5head.cli.train.main([
        "--base-path", str(tiny_data), "--output-dir", str(run), "--backbone", DINOV3, "--no-pretrained",
        "--img-size", "32", "--batch-size", "4", "--epochs", "2", "--train-folds", "0", "1", "--freeze-backbone",
        "--num-workers", "0", "--device-type", "cpu", "--amp-dtype", "float32"]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["backbone"] == DINOV3
    assert biomass5head.cli.eval.main(["--model-dir", str(run), *common]) == 0
    oof = json.loads((run / "oof_metrics.json").read_text())
    assert sorted(oof["per_fold"]) == ["0", "1"]
    # Another --img-size at inference (in a copy of the run): RoPE needs no position-embedding resampling.
    other = tmp_path / "run48"
    shutil.copytree(run, other)
    assert biomass5head.cli.eval.main(["--model-dir", str(other), "--img-size", "48", "--no-feature-cache",
                                       *common]) == 0
    assert json.loads((other / "oof_metrics.json").read_text())["options"]["img_size"] == 48
    assert biomass5head.cli.predict.main(["--model-dir", str(run), *common]) == 0
    sub = pd.read_csv(run / "submission.csv")
    assert len(sub) == 4 * 5 and sub["target"].notna().all()
    assert biomass5head.cli.report.main(["--model-dir", str(run)]) == 0
    assert (run / "report.md").is_file()
