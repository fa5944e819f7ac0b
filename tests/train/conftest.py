"""Shared spied runs of the training-option tests (one per configuration; several test modules look at each)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from spied_run import (
    CPU_AMX,
    FAST_BACKBONE,
    Run,
    train,
)

from biomass5head.model.backbone import create_backbone


@pytest.fixture(scope="session")
def default_run(tiny_data, tmp_path_factory) -> Run:
    """Every option at its default except the FAST_ARGS, two epochs."""
    return train(tmp_path_factory, tiny_data, "--epochs", "2")


@pytest.fixture(scope="session")
def arch_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--no-film", "--no-attention-pool", "--dropout", "0.1",
                 "--hidden-ratio", "0.25", "--grid", "1", "2", "--img-size", "48", "--grad-ckpt", "--grad-clip", "0")


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A backbone weights file for test_vit whose tensors are known."""
    torch.manual_seed(1234)
    state = {k: v.contiguous() for k, v in create_backbone(FAST_BACKBONE, 32, pretrained=False).state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file(state, path)
    return path


@pytest.fixture(scope="session")
def head_only_run(tiny_data, tmp_path_factory, weights_file) -> Run:
    return train(tmp_path_factory, tiny_data, "--freeze-backbone", "--two-stage", "--backbone-weights",
                 str(weights_file), "--head-lr-stage1", "3e-4", "--lr", "5e-4", "--backbone-lr", "7e-5",
                 "--weight-decay", "0.05", "--warmup-epochs", "0", "--epochs", "2")


@pytest.fixture(scope="session")
def two_stage_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--two-stage", "--epochs", "2", "--freeze-epochs", "1",
                 "--warmup-epochs", "0", "--head-lr-stage1", "3e-3", "--lr", "4e-4", "--backbone-lr", "2e-5",
                 "--weight-decay", "0.02")


@pytest.fixture(scope="session")
def two_stage_clipped_run(tiny_data, tmp_path_factory) -> Run:
    """The reference's default --amp-dtype float16 on a CPU with native bfloat16."""
    return train(tmp_path_factory, tiny_data, "--two-stage", "--epochs", "2", "--freeze-epochs", "5",
                 "--amp-dtype", "float16", cpu=CPU_AMX)


@pytest.fixture(scope="session")
def aux_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--use-aux-heads", "--apply-context-adjustment",
                 "--aux-state-weight", "5", "--aux-month-weight", "0", "--aux-species-weight", "2",
                 "--correction-threshold", "1e9")


@pytest.fixture(scope="session")
def loss_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--target-weights", "0.1", "0.1", "0.1", "0.2", "0.5",
                 "--constraint-weight", "0", "--use-focal-loss", "--use-dead-aware-loss", "--no-huber-for-dead",
                 "--always-correct-dead")


@pytest.fixture(scope="session")
def stereo_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--stereo-correct-aug", "--aug-prob", "1", "--stereo-swap-prob", "0.3")


@pytest.fixture(scope="session")
def mix_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--mixup-prob", "0.5", "--mixup-alpha", "0.3", "--cutmix-prob",
                 "0.25", "--cutmix-alpha", "0.7")
