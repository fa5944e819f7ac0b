"""Auxiliary heads, context adjustment, loss options, post-processing and the log target, by their effect on a run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from spied_run import (
    Run,
    fold0_frames,
    head_keys,
    train,
)

import biomass5head.cli.train
import biomass5head.data.datasets
import biomass5head.device
import biomass5head.model.five_head
import biomass5head.train.kfold
import biomass5head.train.trainer
from biomass5head.config import RunConfig
from biomass5head.constants import TARGETS
from biomass5head.data.datasets import BiomassDataset
from biomass5head.data.images import TileSpec
from biomass5head.metrics import compute_metrics
from biomass5head.model.postprocess import (
    apply_postprocess,
    compute_context_ratios,
    correct_dead,
    derive_dead,
    reconcile_targets,
)


def test_aux_heads_are_trained_and_reported(aux_run):
    assert aux_run.rc == 0
    (epoch,) = aux_run.epochs
    assert epoch["before"]["aux"] is not None and epoch["before"]["aux"] != epoch["after"]["aux"]
    assert epoch["loss_fn"].aux_weights == {"state": 5.0, "month": 0.0, "species": 2.0}
    row = aux_run.log_df().iloc[0]
    assert row["train_aux_state"] > 0 and row["train_aux_species"] > 0
    assert row["train_aux_month"] == 0.0  # --aux-month-weight 0
    for head in ("state", "month", "species"):
        assert 0.0 <= row[f"val_acc_{head}"] <= 1.0 and 0.0 <= row[f"train_acc_{head}"] <= 1.0
    assert {k for k in aux_run.ckpt()["model"] if k.startswith("aux_heads.")}


def test_without_aux_heads_nothing_aux_is_logged(default_run):
    assert not [c for c in default_run.log_df().columns if "aux" in c or "acc" in c]
    assert not head_keys(default_run.ckpt(), "aux_heads.")
    assert default_run.trainers[0].loss_fn.aux_weights is None


def test_context_adjustment_stores_training_fold_ratios_and_adjusts_validation(aux_run, tiny_data):
    train_df, val_df = fold0_frames(tiny_data)
    ckpt = aux_run.ckpt()
    assert ckpt["context_ratios"] == compute_context_ratios(train_df)
    (val,) = aux_run.preds
    assert set(val["probs"]) == {"state", "month", "species"}
    expected = apply_postprocess(val["pred"], correction_threshold=1e9, always_correct_dead=False,
                                 context=(val["probs"], ckpt["context_ratios"]))
    row = aux_run.log_df().iloc[0]
    assert row["val_weighted_r2"] == pytest.approx(compute_metrics(val["true"], expected)["weighted_r2"])
    assert row["val_weighted_r2_raw"] == pytest.approx(compute_metrics(val["true"], val["pred"])["weighted_r2"])
    assert row["val_weighted_r2"] != row["val_weighted_r2_raw"]
    np.testing.assert_array_equal(val["true"], val_df[list(TARGETS)].to_numpy(np.float32))


# --------------------------------------------------------------------------------------------------------------
# Loss options and post-processing
# --------------------------------------------------------------------------------------------------------------
def test_default_loss_options_reach_the_loss(default_run):
    loss = default_run.epochs[0]["loss_fn"]
    assert loss is default_run.trainers[0].loss_fn
    assert loss.target_weights.tolist() == pytest.approx([0.2] * 5)
    assert (loss.constraint_weight, loss.use_focal, loss.use_dead_aware, loss.huber_for_dead) == (0.05, False,
                                                                                                    False, True)
    log = default_run.log_df()
    assert (log["train_constraint"] > 0).all() and (log["train_dead_aware"] == 0).all()


def test_loss_options_reach_the_loss(loss_run):
    assert loss_run.rc == 0
    loss = loss_run.epochs[0]["loss_fn"]
    assert loss.target_weights.tolist() == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.5])
    assert (loss.constraint_weight, loss.use_focal, loss.use_dead_aware, loss.huber_for_dead) == (0.0, True, True,
                                                                                                    False)
    row = loss_run.log_df().iloc[0]
    assert row["train_constraint"] == 0.0 and row["train_dead_aware"] > 0
    assert row["train_total"] == pytest.approx(row["train_regression"] + row["train_dead_aware"], rel=1e-5)


def _post_score(run: Run, fn) -> list[float]:
    return [compute_metrics(v["true"], fn(v["pred"]))["weighted_r2"] for v in run.preds]


def test_correction_threshold_applies_to_validation(default_run):
    log = default_run.log_df()
    assert log["val_weighted_r2"].tolist() == pytest.approx(_post_score(default_run, lambda p: correct_dead(p, 0.15)))
    assert log["val_weighted_r2_raw"].tolist() == pytest.approx(_post_score(default_run, lambda p: p))


def test_always_correct_dead_replaces_dead_in_every_row(loss_run):
    log = loss_run.log_df()
    assert log["val_weighted_r2"].tolist() == pytest.approx(_post_score(loss_run, derive_dead))
    assert log["val_weighted_r2"].tolist() != pytest.approx(log["val_weighted_r2_raw"].tolist())


def test_reconcile_applies_to_validation_before_the_dead_correction(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--reconcile")
    assert run.config["post"]["reconcile"] and run.ckpt()["config"]["post"]["reconcile"]
    log = run.log_df()
    assert log["val_weighted_r2"].tolist() == pytest.approx(_post_score(run, reconcile_targets))
    assert log["val_weighted_r2"].tolist() != pytest.approx(_post_score(run, lambda p: correct_dead(p, 0.15)))


def test_a_huge_correction_threshold_leaves_predictions_raw(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--correction-threshold", "1e9", "--batch-size", "32")
    row = run.log_df().iloc[0]
    assert row["val_weighted_r2"] == row["val_weighted_r2_raw"]


def test_log_target_trains_in_log_space_and_scores_in_grams(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--use-log-target")
    assert run.rc == 0
    ckpt = run.ckpt()
    assert ckpt["target_transform"]["log_target"] is True
    assert run.trainers[0].loss_fn.transform.log_target
    # Re-predict the validation fold from the checkpoint by hand: the model's outputs times the scale are
    # log1p(grams); after expm1 they give the score the run logged, and without it a different one.
    cfg = RunConfig.from_dict(ckpt["config"])
    model = biomass5head.model.five_head.build_model(cfg, pretrained=False)
    model.load_state_dict(ckpt["model"])
    model.eval()
    _, val_df = fold0_frames(tiny_data)
    ds = BiomassDataset(val_df, TileSpec(cfg.model.grid, cfg.model.img_size, *model.mean_std))
    with torch.no_grad():
        reg = torch.cat([model(ds[i]["left"][None], ds[i]["right"][None])["reg"] for i in range(len(ds))])
    log_grams = reg.double().numpy() * np.asarray(ckpt["target_transform"]["scale"])
    true = val_df[list(TARGETS)].to_numpy(np.float64)
    grams = compute_metrics(true, np.maximum(np.expm1(log_grams), 0))["weighted_r2"]
    assert grams == pytest.approx(ckpt["metrics"]["raw"]["weighted_r2"], abs=1e-5)
    assert compute_metrics(true, log_grams)["weighted_r2"] != pytest.approx(grams, abs=1e-3)
    assert ckpt["best_score"] == pytest.approx(run.log_df()["val_weighted_r2"].max())
    (val,) = run.preds
    np.testing.assert_allclose(val["true"], true, rtol=1e-6)  # validation truth in grams
