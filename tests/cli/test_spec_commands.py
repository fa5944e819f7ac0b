"""The training commands of the reference ("Example Commands" in 5head_arguments.md), run end to end.

Each command runs as written except for what a CPU test needs: `--device-type cpu`, `--no-pretrained`, ViT-S/14
(`--backbone vit_small_patch14_reg4_dinov2.lvd142m`) on 28 px tiles, one or two epochs, batch 4, no workers,
the tiny synthetic data as `--base-path` and its `trainfold.csv` where the reference uses data/trainfold.csv.
Commands that do not name folds train fold 0 only, to stay cheap. A `--freeze-epochs 5` or `--warmup-epochs 5`
longer than the shortened `--epochs` must be clipped with a warning, not fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from biomass5head.cli.train import main
from biomass5head.config import RunConfig
from biomass5head.data.tables import load_train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BACKBONE = "vit_small_patch14_reg4_dinov2.lvd142m"
CPU_ARGS = ["--device-type", "cpu", "--no-pretrained", "--img-size", "28", "--num-workers", "0", "--batch-size", "4",
            "--backbone", BACKBONE]

COMMANDS = {
    "basic": ["--epochs", "2", "--train-folds", "0"],
    "recommended": ["--epochs", "1", "--freeze-backbone", "--head-lr-stage1", "3e-4", "--grad-clip", "0.5",
                    "--warmup-epochs", "5", "--use-aux-heads", "--aux-month-weight", "0.5", "--aux-state-weight", "0.5",
                    "--aux-species-weight", "0.25", "--use-log-target", "--stereo-correct-aug", "--stereo-swap-prob",
                    "0.5", "--cv-strategy", "group_date", "--train-folds", "0"],
    "two_stage": ["--epochs", "1", "--two-stage", "--freeze-epochs", "5", "--head-lr-stage1", "1e-3", "--lr", "2e-4",
                  "--backbone-lr", "1e-5", "--use-log-target", "--stereo-correct-aug", "--stereo-swap-prob", "0.5",
                  "--train-folds", "0"],
    "mixup_cutmix": ["--epochs", "1", "--freeze-backbone", "--use-log-target", "--mixup-prob", "0.2",
                     "--cutmix-prob", "0.2", "--train-folds", "0"],
    # The point of these two is the folds: the first trains every fold of the file, the second the folds it names.
    "fold_csv": ["--fold-csv", "{fold_csv}", "--epochs", "1", "--freeze-backbone", "--use-log-target"],
    "fold_csv_some_folds": ["--fold-csv", "{fold_csv}", "--train-folds", "0", "2", "4", "--epochs", "1"],
}
TRAINED_FOLDS = {"fold_csv": [0, 1, 2, 3, 4], "fold_csv_some_folds": [0, 2, 4]}


def command(name: str, data: Path, out: Path) -> list[str]:
    args = [a.replace("{fold_csv}", str(data / "trainfold.csv")) for a in COMMANDS[name]]
    # a feature cache of the run's own, so no run depends on what other tests cached before it
    return ["--base-path", str(data), "--output-dir", str(out), "--feature-cache", str(out.parent / "feature_cache"),
            *args, *CPU_ARGS]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, tuple[int, Path]]:
    """Every command except `basic` (which runs as a subprocess below), in process."""
    done = {}
    for name in COMMANDS:
        if name == "basic":
            continue
        out = tmp_path_factory.mktemp("e2e") / name
        done[name] = (main(command(name, tiny_data, out)), out)
    return done


@pytest.fixture(scope="module")
def basic(tiny_data, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("e2e") / "basic"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as the in-process runs
    proc = subprocess.run([sys.executable, "-m", "src.train_5head", *command("basic", tiny_data, out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def check_run_folder(out: Path, folds: list[int], epochs: int, data: Path) -> dict:
    """The files every run writes, consistent with each other; returns config.json."""
    config = json.loads((out / "config.json").read_text())
    cfg = RunConfig.from_dict(config)
    assert sorted(p.name for p in out.glob("5head_best_fold*.pth")) == [f"5head_best_fold{k}.pth" for k in folds]
    folds_csv = pd.read_csv(out / "folds.csv")
    assert list(folds_csv.columns) == ["sample_id_prefix", "fold"]
    assert folds_csv["sample_id_prefix"].tolist() == load_train(data)["sample_id_prefix"].tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["folds"]) == [str(k) for k in folds]
    for k in folds:
        ckpt = torch.load(out / f"5head_best_fold{k}.pth", map_location="cpu", weights_only=True)
        assert ckpt["fold"] == k and ckpt["config"] == config
        assert ckpt["target_transform"]["log_target"] == cfg.loss.use_log_target
        assert ckpt["best_score"] == pytest.approx(summary["folds"][str(k)]["best_score"])
        log = pd.read_csv(out / f"log_fold{k}.csv")
        assert log["epoch"].tolist() == list(range(epochs))
        assert log["val_weighted_r2"].max() == pytest.approx(ckpt["best_score"])
        assert summary["folds"][str(k)]["n_val"] == int((folds_csv["fold"] == k).sum())
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return config


def test_basic_training(basic, tiny_data):
    proc, out = basic
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = check_run_folder(out, [0], 2, tiny_data)
    assert config["train"]["epochs"] == 2 and config["model"]["backbone"] == BACKBONE
    assert "mode single_stage" in proc.stdout


def test_recommended_setup(runs, tiny_data):
    rc, out = runs["recommended"]
    assert rc == 0
    config = check_run_folder(out, [0], 1, tiny_data)
    assert config["train"]["warmup_epochs"] == 1  # clipped from 5
    assert config["loss"]["aux_month_weight"] == 0.5 and config["loss"]["aux_species_weight"] == 0.25
    log = pd.read_csv(out / "log_fold0.csv")
    assert {"train_aux_state", "val_acc_state", "val_acc_month", "val_acc_species"} <= set(log.columns)
    assert log["stage"].tolist() == ["head_only"]
    folds = pd.read_csv(out / "folds.csv").merge(load_train(tiny_data), on="sample_id_prefix")
    assert (folds.groupby("Sampling_Date")["fold"].nunique() == 1).all()  # --cv-strategy group_date


def test_two_stage_training(runs, tiny_data):
    rc, out = runs["two_stage"]
    assert rc == 0
    config = check_run_folder(out, [0], 1, tiny_data)
    assert config["train"]["freeze_epochs"] == 1 and config["train"]["two_stage"]  # clipped from 5
    assert pd.read_csv(out / "log_fold0.csv")["stage"].tolist() == ["stage1"]


def test_mixup_cutmix_training(runs, tiny_data):
    rc, out = runs["mixup_cutmix"]
    assert rc == 0
    config = check_run_folder(out, [0], 1, tiny_data)
    assert (config["aug"]["mixup_prob"], config["aug"]["cutmix_prob"]) == (0.2, 0.2)


@pytest.mark.parametrize("name", ["fold_csv", "fold_csv_some_folds"])
def test_predefined_folds(runs, tiny_data, name):
    rc, out = runs[name]
    assert rc == 0
    check_run_folder(out, TRAINED_FOLDS[name], 1, tiny_data)
    given = pd.read_csv(tiny_data / "trainfold.csv").set_index("sample_id_prefix")["fold"]
    written = pd.read_csv(out / "folds.csv").set_index("sample_id_prefix")["fold"]
    assert written.sort_index().equals(given.sort_index())
