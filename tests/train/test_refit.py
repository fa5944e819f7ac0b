"""`--refit` (in `--recipe robust`): after the inner split has chosen a fold's epoch, the fold is trained again on all
its training images up to that epoch, and that model is the fold's checkpoint; the scored fold stays unseen."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from spied_run import N_TRAIN_FOLD0, digest, train

from biomass5head.data.folds import make_folds
from biomass5head.data.tables import load_train
from biomass5head.train.refit import RefitTrainer

# inner-split scores per validation: the best is the second epoch of four (patience 2 stops after the fourth)
SCORES = [0.1, 0.5, 0.3, 0.2] + [0.0] * 10


@pytest.fixture(scope="module")
def refit_run(tiny_data, tmp_path_factory):
    return train(tmp_path_factory, tiny_data, "--select-on", "inner", "--inner-frac", "0.25", "--refit",
                 "--freeze-backbone", "--ridge-base", "--epochs", "6", "--patience", "2", scores=SCORES)


def test_refit_trains_on_every_training_image_up_to_the_chosen_epoch(refit_run, tiny_data):
    assert refit_run.rc == 0
    selection, refit = refit_run.trainers
    assert not isinstance(selection, RefitTrainer) and isinstance(refit, RefitTrainer)
    df = load_train(tiny_data)
    scored = set(df["sample_id_prefix"][make_folds(df, "group_month", 5, 18) == 0])
    fit, select = set(selection.train_df["sample_id_prefix"]), set(selection.val_df["sample_id_prefix"])
    everything = set(refit.train_df["sample_id_prefix"])
    assert everything == fit | select and len(everything) == N_TRAIN_FOLD0 and not everything & scored
    assert len(refit.train_df) == N_TRAIN_FOLD0  # each image once
    # the selection pass stopped 2 epochs after its best (epoch 1); the refit ran epochs 0 and 1 only
    assert selection.progress.best_epoch == 1 and selection.progress.epoch == 4
    assert refit.progress.epoch == 2
    assert len(refit_run.epochs) == 4 + 2
    refit_log = pd.read_csv(refit_run.out / "log_fold0_refit.csv")
    assert refit_log["epoch"].tolist() == [0, 1]
    assert len(refit_run.log_df()) == 4  # the selection pass's log is kept as it was
    fold = refit_run.summary["folds"]["0"]
    assert fold["refit_epochs"] == 2 and fold["n_refit"] == N_TRAIN_FOLD0 and fold["best_epoch"] == 1
    assert fold["best_score"] == pytest.approx(0.5)  # the score reported is the inner split's, not in-sample


def test_refit_checkpoint_holds_the_refitted_weights(refit_run):
    selection, refit = refit_run.trainers
    ckpt = refit_run.ckpt()
    assert ckpt["epoch"] == 1
    model = refit.model
    model.load_state_dict(ckpt["model"])
    assert digest(model.heads) == refit_run.epochs[-1]["after"]["heads"]  # the refit's last epoch
    assert digest(model.heads) != refit_run.epochs[1]["after"]["heads"]  # not the selection pass's epoch 1
    # the ridge base: refitted on all 24 images, with the alpha the selection pass chose on the inner split
    assert not torch.equal(selection.model.ridge.weight, refit.model.ridge.weight)
    alphas = [m.split("alpha ")[1].split()[0] for m in refit_run.log if "ridge base fitted" in m]
    assert len(alphas) == 2 and alphas[0] == alphas[1]
    assert any(f"ridge base fitted on {N_TRAIN_FOLD0} images" in m for m in refit_run.log)
    assert not list(refit_run.out.glob("5head_last_fold*"))  # resume states removed once the fold is recorded
    assert any("refitting on all 24 training images for 2 epochs" in m for m in refit_run.log)


def test_eval_says_the_folds_were_refitted(refit_run, capsys):
    from biomass5head.cli.eval import main as eval_main

    assert eval_main(["--model-dir", str(refit_run.out), "--device", "cpu"]) == 0
    metrics = json.loads((refit_run.out / "oof_metrics.json").read_text())
    assert metrics["selection"].startswith("inner (") and "refitted on all its training images" in metrics["selection"]
