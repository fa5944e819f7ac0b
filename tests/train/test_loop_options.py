"""Training-loop options (batch size, grad accum, clipping, patience, image cache, workers, learning rates, warmup),
by their effect on a run."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from spied_run import (
    CPU_AMX,
    N_TRAIN_FOLD0,
    comparable_log,
    lr_groups,
    param_ids,
    train,
)


def test_batch_size_sets_the_batches(default_run, tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--batch-size", "8")
    assert len(run.trainers[0].train_df) == N_TRAIN_FOLD0
    assert run.log_df()["train_optimizer_steps"].tolist() == [N_TRAIN_FOLD0 // 8]
    assert [f["shape"][0] for f in run.train_forwards()] == [8, 8, 8]
    assert [f["shape"][0] for f in default_run.train_forwards()] == [4] * 12


def test_grad_accum_halves_the_optimizer_steps(default_run, tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--grad-accum", "2", "--grad-clip", "0.5")
    assert default_run.log_df()["train_optimizer_steps"].tolist() == [6, 6]
    assert run.log_df()["train_optimizer_steps"].tolist() == [3]
    # clip_grad_norm_ runs once per optimizer step, with --grad-clip as its max norm
    assert run.clips == [0.5] * 3


def test_grad_clip_reaches_clip_grad_norm(default_run, arch_run):
    assert default_run.clips == [1.0] * 12  # default 1.0, once per optimizer step
    assert arch_run.clips == []  # --grad-clip 0 turns clipping off


def test_patience_stops_after_that_many_epochs_without_improvement(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--epochs", "5", "--patience", "1", "--batch-size", "32",
                scores=[0.5, 0.4, 0.3, 0.2, 0.1])
    fold = run.summary["folds"]["0"]
    assert (fold["epochs_run"], fold["best_epoch"], fold["best_score"]) == (2, 0, 0.5)
    assert run.ckpt()["epoch"] == 0 and len(run.log_df()) == 2


def test_patience_counts_from_the_last_improvement(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--epochs", "6", "--patience", "2", "--batch-size", "32",
                "--amp-dtype", "bfloat16", scores=[0.5, 0.4, 0.6, 0.3, 0.2, 0.1], cpu=CPU_AMX)
    fold = run.summary["folds"]["0"]
    assert (fold["epochs_run"], fold["best_epoch"], fold["best_score"]) == (5, 2, 0.6)
    log = run.log_df()
    assert log["val_weighted_r2"].tolist() == [0.5, 0.4, 0.6, 0.3, 0.2]
    assert log["best"].tolist() == [True, False, True, False, False]
    ckpt = run.ckpt()
    assert ckpt["epoch"] == 2 and ckpt["best_score"] == 0.6
    # --amp-dtype bfloat16 on a CPU with native bfloat16: autocast in bfloat16, no warning
    assert {(f["autocast"], f["dtype"]) for f in run.forwards} == {(True, torch.bfloat16)}
    assert "--amp-dtype" not in run.log_text


def test_cache_images_decodes_each_photo_once(default_run, tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--cache-images", "--epochs", "2")
    assert run.rc == 0
    paths = [p for p, _, _ in run.loads]
    assert len(paths) == 30 and len(set(paths)) == 30  # once per photo, for both epochs and validation
    assert run.trainers[0].train_loader.dataset.image_cache is not None
    # without the cache every epoch decodes the 24 training and 6 validation photos again
    assert len(default_run.loads) == 2 * 30
    assert default_run.trainers[0].train_loader.dataset.image_cache is None


@pytest.mark.slow  # 3-6 s (processes or an extra run): in .ci/run's slow pass; README command 2 under 6 min
def test_num_workers_and_prefetch_factor(tiny_data, tmp_path_factory):
    args = ("--num-workers", "2", "--prefetch-factor", "2", "--epochs", "2", "--stereo-swap-prob", "0.5",
            "--mixup-prob", "0.5")
    run = train(tmp_path_factory, tiny_data, *args)
    assert run.rc == 0
    loader = run.trainers[0].train_loader
    assert loader.num_workers == 2 and loader.prefetch_factor == 2
    log = run.log_df()
    assert log["train_optimizer_steps"].tolist() == [6, 6] and np.isfinite(log["val_weighted_r2"]).all()
    # augmentation and mixing in the workers are seeded too: the run repeats exactly
    again = train(tmp_path_factory, tiny_data, *args)
    pd.testing.assert_frame_equal(comparable_log(run), comparable_log(again))


def test_single_stage_uses_lr_backbone_lr_and_weight_decay(default_run):
    (opt,) = default_run.optimizers
    assert opt["stage"] == "single"
    assert lr_groups(opt) == {("head", 0.01): 2e-4, ("head", 0.0): 2e-4, ("backbone", 0.01): 1e-5,
                            ("backbone", 0.0): 1e-5}
    model = default_run.trainers[0].model
    assert param_ids(opt, "backbone") == {id(p) for p in model.backbone.parameters()}
    assert param_ids(opt, "head") == {id(p) for p in model.head_parameters()}
    for epoch in default_run.epochs:  # the backbone trains in every epoch
        assert epoch["before"]["backbone"] != epoch["after"]["backbone"]


def test_warmup_is_linear_then_cosine(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--epochs", "4", "--warmup-epochs", "1", "--batch-size", "8")
    log = run.log_df()
    assert log["train_optimizer_steps"].tolist() == [3, 3, 3, 3]

    def factor(step, warmup=3, total=12):  # per optimizer step; the log shows the LR at the start of each epoch
        if step < warmup:
            return (step + 1) / warmup
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    expected = [factor(3 * e) for e in range(4)]  # 1/3, 1, 0.7525, 0.2575
    assert log["lr_head"].tolist() == pytest.approx([2e-4 * f for f in expected])
    assert log["lr_backbone"].tolist() == pytest.approx([1e-5 * f for f in expected])
    assert log["lr_head"].idxmax() == 1  # rises during warmup, falls after it


def test_default_warmup_covers_the_first_two_epochs(default_run):
    # 6 steps per epoch, 12 warmup steps: the LR at the start of epochs 0 and 1 is 1/12 and 7/12 of --lr
    assert default_run.log_df()["lr_head"].tolist() == pytest.approx([2e-4 / 12, 2e-4 * 7 / 12])
