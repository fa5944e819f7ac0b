"""--interval-heads K / --interval-weight W in a run: the fold's bins are fitted on its training images and kept in
the checkpoint, the cross-entropy joins the loss, accuracies are logged, and eval / predict rebuild the heads."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from spied_run import fold0_frames, head_keys, train

import biomass5head.cli.eval
import biomass5head.cli.predict
from biomass5head.constants import TARGET_SHORT, TARGETS
from biomass5head.model.intervals import IntervalBins, interval_accuracy

HEAD_ONLY = ["--freeze-backbone", "--aug-prob", "0", "--epochs", "2", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    return {"off": train(tmp_path_factory, tiny_data, *HEAD_ONLY),
            "on": train(tmp_path_factory, tiny_data, *HEAD_ONLY, "--interval-heads", "3", "--interval-weight", "0.5")}


def test_bins_come_from_the_training_fold_and_reach_the_checkpoint(runs, tiny_data):
    run = runs["on"]
    assert run.rc == 0
    train_df, _ = fold0_frames(tiny_data)
    expected = IntervalBins.fit(train_df[list(TARGETS)].to_numpy(np.float64), 3)
    ckpt = run.ckpt()
    assert IntervalBins.from_dict(ckpt["interval_bins"]) == expected
    assert ckpt["config"]["model"]["interval_heads"] == 3 and ckpt["config"]["loss"]["interval_weight"] == 0.5
    widths = [ckpt["model"][f"interval_heads.{j}.1.weight"].shape[0] for j in range(5)]
    assert tuple(widths) == expected.sizes
    assert any("interval bins per target" in m for m in run.log)


def test_the_loss_and_log_carry_the_interval_term_and_accuracies(runs):
    on, off = runs["on"].log_df(), runs["off"].log_df()
    assert (on["train_interval"] > 0).all()
    np.testing.assert_allclose(on["train_total"], on["train_regression"] + on["train_constraint"]
                               + on["train_dead_aware"] + on["train_interval"], rtol=1e-6)
    for col in ["train_acc_interval", "val_acc_interval", *(f"val_acc_interval_{t}" for t in TARGET_SHORT)]:
        assert on[col].between(0, 1).all(), col
    assert not [c for c in off.columns if "interval" in c]  # off by default: the reference's log
    assert not head_keys(runs["off"].ckpt(), "interval_heads") and runs["off"].ckpt()["interval_bins"] is None


def test_validation_accuracy_uses_the_training_folds_bins(runs, tiny_data):
    run = runs["on"]
    train_df, val_df = fold0_frames(tiny_data)
    bins = IntervalBins.fit(train_df[list(TARGETS)].to_numpy(np.float64), 3)
    last = run.preds[-1]  # the last epoch's validation predictions
    np.testing.assert_allclose(last["true"], val_df[list(TARGETS)].to_numpy(np.float64), rtol=1e-6)
    expected = interval_accuracy(bins, last["probs"]["interval"], last["true"])
    row = run.log_df().iloc[-1]
    for key, value in expected.items():
        assert row[f"val_{key}"] == pytest.approx(value)
    assert last["probs"]["interval"].shape == (len(val_df), sum(bins.sizes))


def test_eval_predict_and_the_photo_service_rebuild_the_heads(runs, tiny_data):
    from biomass5head.data.images import decode_photo
    from biomass5head.infer.photo_service import PhotoPredictor

    out = runs["on"].out
    assert biomass5head.cli.eval.main(["--model-dir", str(out), "--num-workers", "0", "--device", "cpu"]) == 0
    assert biomass5head.cli.predict.main(["--model-dir", str(out), "--num-workers", "0", "--device", "cpu"]) == 0
    assert pd.read_csv(out / "submission.csv")["target"].notna().all()
    predictor = PhotoPredictor(out, device="cpu", ood=False)
    photo = decode_photo(next((tiny_data / "test").glob("*.jpg")))
    assert np.isfinite(predictor.predict(photo)["grams"]).all()


def test_with_mixup_each_photo_keeps_its_own_bins(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--interval-heads", "3", "--mixup-prob", "1.0", "--aug-prob", "0")
    assert run.rc == 0
    (epoch,) = run.epochs
    assert (run.log_df()["train_interval"] > 0).all()
    batch = next(iter(epoch["loader"]))
    pair, lam = batch["mix_targets"], batch["mix_lam"]
    assert pair.shape == (len(lam), 2, 5) and bool((lam < 1).any())  # (a photo without a partner stays unmixed)
    np.testing.assert_allclose(batch["target"], lam[:, None] * pair[:, 0] + (1 - lam[:, None]) * pair[:, 1],
                               rtol=1e-5, atol=1e-4)


def test_bad_values_are_refused(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--interval-heads", "1")
    assert run.rc == 2 and any("--interval-heads must be 0 (off) or 2-50" in m for m in run.log)
    run = train(tmp_path_factory, tiny_data, "--interval-heads", "3", "--interval-weight", "-1")
    assert run.rc == 2 and any("--interval-weight must be a finite number >= 0" in m for m in run.log)
