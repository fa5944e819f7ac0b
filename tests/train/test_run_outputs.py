"""What a training run writes (checkpoint, logs, summary, run folder) and how it fails on bad input."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from spied_run import (
    FAST_ARGS,
    fold0_frames,
    train,
)

import biomass5head.cli.train
import biomass5head.data.datasets
import biomass5head.device
import biomass5head.model.five_head
import biomass5head.train.kfold
import biomass5head.train.trainer
from biomass5head.cli.train import build_parser, config_from_args
from biomass5head.config import RunConfig
from biomass5head.constants import TARGETS
from biomass5head.model.targets import TargetTransform


def test_run_writes_every_file(default_run):
    assert default_run.rc == 0
    names = {p.name for p in default_run.out.iterdir()}
    assert {"5head_best_fold0.pth", "folds.csv", "config.json", "log_fold0.csv", "summary.json",
            "learning_curves.png"} <= names
    assert (default_run.out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in names if n.endswith(".tmp")]


def test_checkpoint_is_plain_data_with_config_fold_epoch_score_transform(default_run, tiny_data):
    ckpt = default_run.ckpt()  # weights_only=True: tensors and plain Python types only
    assert {"model", "config", "fold", "epoch", "best_score", "target_transform", "context_ratios"} <= set(ckpt)
    assert ckpt["config"] == default_run.config  # the same plain dict as config.json
    cfg = RunConfig.from_dict(ckpt["config"])
    assert cfg == config_from_args(build_parser().parse_args(
        ["--base-path", str(tiny_data), *FAST_ARGS, "--epochs", "2", "--no-pretrained", "--output-dir",
         str(default_run.out), "--feature-cache", str(default_run.out.parent / "feature_cache")]))
    fold = default_run.summary["folds"]["0"]
    log = default_run.log_df()
    assert ckpt["fold"] == 0 and ckpt["epoch"] == fold["best_epoch"]
    assert ckpt["best_score"] == pytest.approx(fold["best_score"]) == pytest.approx(log["val_weighted_r2"].max())
    train_df, _ = fold0_frames(tiny_data)
    expected = TargetTransform.fit(train_df[list(TARGETS)].to_numpy(), log_target=False).to_dict()
    assert ckpt["target_transform"] == expected
    assert ckpt["context_ratios"] is None  # no aux heads
    # The weights load back into the model the configuration describes.
    model = biomass5head.model.five_head.build_model(cfg, pretrained=False)
    model.load_state_dict(ckpt["model"])


def test_log_has_one_row_per_epoch_and_summary_counts_them(default_run):
    log = default_run.log_df()
    assert log["epoch"].tolist() == [0, 1]
    assert default_run.summary["folds"]["0"]["epochs_run"] == 2
    assert default_run.summary["train_folds"] == [0]
    assert np.isfinite(log.drop(columns=["stage"]).to_numpy(dtype=float)).all()


def test_summary_names_the_competition_weights(default_run):
    assert "Dry_Clover_g 0.1, GDM_g 0.2, Dry_Total_g 0.5" in default_run.summary["metric"]


def test_default_output_dir_is_timestamped(tiny_data, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train(tmp_path_factory, tiny_data, "--batch-size", "32", output_dir=False)
    assert run.rc == 0
    (made,) = (tmp_path / "outputs").iterdir()
    assert re.fullmatch(r"5head_\d{8}_\d{6}", made.name)
    assert (made / "5head_best_fold0.pth").is_file() and (made / "summary.json").is_file()


def test_output_dir_holding_a_run_is_refused(default_run, tiny_data, capsys):
    before = {p.name: p.read_bytes() for p in default_run.out.iterdir()}
    rc = biomass5head.cli.train.main(["--base-path", str(tiny_data), *FAST_ARGS, "--no-pretrained", "--output-dir",
                               str(default_run.out)])
    assert rc == 2
    assert f"--output-dir {default_run.out} already holds a run" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in default_run.out.iterdir()} == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_type_cuda_without_cuda_is_a_clear_error(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = biomass5head.cli.train.main(["--base-path", str(tiny_data), *FAST_ARGS, "--no-pretrained", "--output-dir",
                               str(out), "--device-type", "cuda"])
    assert rc == 2
    assert "--device-type cuda" in capsys.readouterr().out
    assert not out.exists()


def test_base_path_without_data_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    rc = biomass5head.cli.train.main(["--base-path", str(tmp_path / "nowhere"), *FAST_ARGS, "--no-pretrained",
                               "--output-dir", str(out)])
    assert rc == 2
    assert "nowhere" in capsys.readouterr().out
    assert not out.exists()


def test_non_finite_loss_stops_with_a_message_naming_step_and_terms(tiny_data, tmp_path_factory, monkeypatch):
    """A NaN loss stops the run at once: exit code 2, a message naming the epoch, step and loss terms."""
    import biomass5head.train.losses

    forward = biomass5head.train.losses.BiomassLoss.forward

    def nan_loss(self, *a, **kw):
        loss, terms = forward(self, *a, **kw)
        return loss * float("nan"), terms

    monkeypatch.setattr(biomass5head.train.losses.BiomassLoss, "forward", nan_loss)
    run = train(tmp_path_factory, tiny_data, "--epochs", "1")
    assert run.rc == 2
    assert re.search(r"non-finite loss at epoch 0 step 0: regression=", run.log_text)
    assert not list(run.out.glob("5head_best_fold*.pth"))


def test_out_of_memory_is_a_clear_error_naming_the_options_to_lower(tiny_data, tmp_path_factory, monkeypatch):
    """A device out of memory is the settings' fault, not a bug: exit code 2 and the options that lower memory."""
    import biomass5head.train.trainer

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(biomass5head.train.trainer.FoldTrainer, "run", out_of_memory)
    run = train(tmp_path_factory, tiny_data, "--epochs", "1")
    assert run.rc == 2
    assert "fold 0: cpu ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower --batch-size or " \
           "--img-size, or add --grad-ckpt" in run.log_text


def _rescore(run, val_df) -> float:
    """The raw weighted R2 of the fold-0 checkpoint on its validation images, computed here by hand: the model's
    outputs times the per-target scale are grams (no log target), scored with compute_metrics."""
    from biomass5head.data.datasets import BiomassDataset
    from biomass5head.data.images import TileSpec
    from biomass5head.metrics import compute_metrics

    ckpt = run.ckpt()
    cfg = RunConfig.from_dict(ckpt["config"])
    model = biomass5head.model.five_head.build_model(cfg, pretrained=False)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ds = BiomassDataset(val_df, TileSpec(cfg.model.grid, cfg.model.img_size, *model.mean_std))
    with torch.no_grad():
        reg = torch.cat([model(ds[i]["left"][None], ds[i]["right"][None])["reg"] for i in range(len(ds))])
    grams = reg.double().numpy() * np.asarray(ckpt["target_transform"]["scale"])
    return compute_metrics(val_df[list(TARGETS)].to_numpy(np.float64), grams)["weighted_r2"]


def test_the_checkpoint_holds_the_best_epochs_weights_and_the_baseline_is_the_training_mean(tiny_data,
                                                                                              tmp_path_factory):
    """Scripted validation scores make epoch 1 of 3 the best: the checkpoint must hold epoch 1's weights (its raw
    score re-computed from the file equals epoch 1's logged raw score, not epoch 2's)."""
    from spied_run import fold0_frames

    from biomass5head.metrics import compute_metrics

    run = train(tmp_path_factory, tiny_data, "--epochs", "3", "--warmup-epochs", "0", "--lr", "3e-3",
                scores=[0.1, 0.9, 0.3])
    assert run.rc == 0
    log = run.log_df()
    assert log["best"].tolist() == [True, True, False] and run.ckpt()["epoch"] == 1
    assert log["val_weighted_r2_raw"][1] != pytest.approx(log["val_weighted_r2_raw"][2], abs=1e-6)
    train_df, val_df = fold0_frames(tiny_data)
    assert _rescore(run, val_df) == pytest.approx(log["val_weighted_r2_raw"][1], abs=1e-5)
    mean = train_df[list(TARGETS)].to_numpy(np.float64).mean(0)
    true = val_df[list(TARGETS)].to_numpy(np.float64)
    baseline = compute_metrics(true, np.tile(mean, (len(true), 1)))["weighted_r2"]
    assert run.summary["folds"]["0"]["baseline_train_mean_r2"] == pytest.approx(baseline, rel=1e-12)
