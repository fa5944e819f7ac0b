"""A tiny finished head-only run for the page, the API and the ONNX export: timm's test_vit from one weights file,
so every fold shares the same frozen backbone (as a run from pretrained weights does)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from biomass5head.model.backbone import create_backbone

SERVE_TRAIN = ["--backbone", "test_vit", "--img-size", "32", "--grid", "2", "2", "--batch-size", "4",
               "--num-workers", "0", "--device-type", "cpu", "--amp-dtype", "float32", "--epochs", "2",
               "--freeze-backbone", "--aug-prob", "0", "--train-folds", "0", "1", "--reconcile"]


@pytest.fixture(scope="session")
def serve_run(tiny_data, tmp_path_factory) -> Path:
    import biomass5head.cli.train

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(7)
    weights = root / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("test_vit", 32, pretrained=False).state_dict().items()},
              weights)
    run = root / "run"
    assert biomass5head.cli.train.main(["--base-path", str(tiny_data), "--output-dir", str(run), *SERVE_TRAIN,
                                        "--backbone-weights", str(weights)]) == 0
    return run


@pytest.fixture(scope="session")
def predictor(serve_run):
    from biomass5head.infer.photo_service import PhotoPredictor

    return PhotoPredictor(serve_run, device="cpu")


@pytest.fixture(scope="session")
def client(predictor):
    from fastapi.testclient import TestClient

    from biomass5head.serve.app import create_app

    return TestClient(create_app(predictor, max_upload_mb=0.5))
