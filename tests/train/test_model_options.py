"""Model architecture options (FiLM, pooling, dropout, hidden ratio, grid, img size, grad ckpt, weights), by their
effect on a run."""
from __future__ import annotations

import pytest
import torch
from spied_run import (
    FAST_BACKBONE,
    head_keys,
    train,
)

import biomass5head.cli.train
import biomass5head.data.datasets
import biomass5head.device
import biomass5head.model.five_head
import biomass5head.train.kfold
import biomass5head.train.trainer
from biomass5head.model.backbone import create_backbone


def test_film_and_attention_pool_are_on_by_default(default_run):
    ckpt = default_run.ckpt()
    assert head_keys(ckpt, "film.") and head_keys(ckpt, "pool.")


def test_no_film_and_no_attention_pool_remove_their_parameters(arch_run):
    assert arch_run.rc == 0
    ckpt = arch_run.ckpt()
    assert head_keys(ckpt, "film.") == [] and head_keys(ckpt, "pool.") == []
    model = arch_run.trainers[0].model
    assert model.film is None and model.pool is None


def test_dropout_and_hidden_ratio_reach_the_model(default_run, arch_run):
    # hidden = 2 x D x ratio with D = 64 for test_vit
    assert tuple(default_run.ckpt()["model"]["proj.1.weight"].shape) == (64, 128)
    assert tuple(arch_run.ckpt()["model"]["proj.1.weight"].shape) == (32, 128)
    for run, p in ((default_run, 0.2), (arch_run, 0.1)):
        model = run.trainers[0].model
        drops = [m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)
                 and not name.startswith("backbone.")]
        assert len(drops) == 6 and set(drops) == {p}  # projection + five heads


def test_grid_and_img_size_reach_decoding_and_the_model(default_run, arch_run):
    assert {f["shape"][1:] for f in default_run.forwards} == {(1, 3, 32, 32)}
    assert {f["shape"][1:] for f in arch_run.forwards} == {(2, 3, 48, 48)}  # --grid 1 2: two tiles per view
    assert all(f["right_shape"] == f["shape"] for f in arch_run.forwards)
    assert {(g, s) for _, g, s in arch_run.loads} == {((1, 2), 48)}
    assert arch_run.config["model"]["grid"] == [1, 2]


def test_grad_ckpt_checkpoints_the_backbone_blocks(default_run, arch_run):
    assert arch_run.trainers[0].model.backbone.grad_checkpointing
    assert arch_run.grad_ckpt_calls > 0
    assert not default_run.trainers[0].model.backbone.grad_checkpointing
    assert default_run.grad_ckpt_calls == 0


@pytest.mark.slow  # 3-6 s (processes or an extra run): in .ci/run's slow pass; README command 2 under 6 min
def test_non_register_backbone_trains(tiny_data, tmp_path_factory):
    name = "vit_small_patch14_dinov2.lvd142m"
    run = train(tmp_path_factory, tiny_data, "--backbone", name, "--img-size", "28", "--freeze-backbone",
                "--batch-size", "8")
    assert run.rc == 0
    ckpt = run.ckpt()
    assert ckpt["config"]["model"]["backbone"] == name
    backbone_keys = {k[len("backbone."):] for k in ckpt["model"] if k.startswith("backbone.")}
    assert backbone_keys == set(create_backbone(name, 28, pretrained=False).state_dict())
    assert "reg_token" not in backbone_keys
    assert tuple(ckpt["model"]["proj.1.weight"].shape) == (384, 768)  # ViT-S: D = 384


def test_img_size_not_a_multiple_of_the_patch_is_a_clear_error(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = biomass5head.cli.train.main(["--base-path", str(tiny_data), "--output-dir", str(out), "--backbone",
                               "vit_small_patch14_reg4_dinov2.lvd142m", "--no-pretrained", "--img-size", "30",
                               "--device-type", "cpu"])
    assert rc == 2
    text = capsys.readouterr().out
    assert "--img-size 30" in text and "patch size 14" in text
    assert not out.exists()


def test_missing_pretrained_weights_offline_is_a_clear_error(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    out = tmp_path / "run"
    rc = biomass5head.cli.train.main(["--base-path", str(tiny_data), "--output-dir", str(out),
                                      "--backbone", FAST_BACKBONE, "--img-size", "32", "--device-type", "cpu"])
    assert rc == 2
    text = capsys.readouterr().out
    assert "--backbone-weights" in text and "--no-pretrained" in text
    assert not out.exists()
