"""On a CUDA device: the reference's float16 autocast with a GradScaler trains, and evaluation on the GPU agrees
with the CPU's. Skipped, with the reason, where there is no CUDA device."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from biomass5head.cli import eval as eval_cli
from biomass5head.cli import train as train_cli

pytestmark = pytest.mark.gpu
ARGS = ["--backbone", "vit_small_patch14_reg4_dinov2.lvd142m", "--no-pretrained", "--img-size", "56",
        "--batch-size", "4", "--epochs", "2", "--train-folds", "0", "--num-workers", "2"]


@pytest.fixture(scope="module")
def gpu_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "run"
    assert train_cli.main(["--base-path", str(tiny_data), "--output-dir", str(out), "--device-type", "cuda",
                           *ARGS]) == 0
    return out


def test_float16_autocast_with_a_grad_scaler_trains_on_cuda(gpu_run):
    runtime = json.loads((gpu_run / "config.json").read_text())["runtime"]
    assert runtime["device"].startswith("cuda") and runtime["amp_dtype_used"] == "float16"
    log = pd.read_csv(gpu_run / "log_fold0.csv")
    assert len(log) == 2 and log["train_total"].notna().all()


def test_eval_on_the_gpu_agrees_with_the_cpu(gpu_run, tmp_path):
    tables = {}
    for device in ("cuda", "cpu"):
        run = tmp_path / device
        shutil.copytree(gpu_run, run)
        assert eval_cli.main(["--model-dir", str(run), "--device", device]) == 0
        tables[device] = pd.read_csv(run / "oof_predictions.csv").filter(like="pred_").to_numpy()
    # float16 on the GPU against float32 on the CPU: within half-precision rounding of the grams
    assert abs(tables["cuda"] - tables["cpu"]).max() <= 2e-2 * max(1.0, abs(tables["cpu"]).max())
