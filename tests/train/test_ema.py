"""--ema-decay: an exponential moving average of the weights, updated every optimizer step, is what validation
scores and what the best checkpoint keeps; the resume state carries it."""
from __future__ import annotations

import pytest
import torch
from spied_run import N_TRAIN_FOLD0, train

from biomass5head.model.checkpoint import load_checkpoint

HEAD_ONLY = ["--freeze-backbone", "--aug-prob", "0", "--epochs", "1", "--warmup-epochs", "0", "--dropout", "0",
             "--head-lr-stage1", "5e-2"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    return {d: train(tmp_path_factory, tiny_data, *HEAD_ONLY, "--ema-decay", d) for d in ("0", "0.9")}


def test_the_checkpoint_holds_the_average_not_the_last_weights(runs):
    run = runs["0.9"]
    assert run.rc == 0
    (trainer,) = run.trainers
    ema = trainer.ema
    assert ema is not None
    assert int(ema.n_averaged) == N_TRAIN_FOLD0 // 4  # one update per optimizer step: 24 images, batch 4
    saved = load_checkpoint(run.out / "5head_best_fold0.pth")["model"]
    average, last = ema.module.state_dict(), trainer.model.state_dict()
    head = "heads.0.net.0.weight"
    torch.testing.assert_close(saved[head], average[head].cpu())
    assert not torch.allclose(saved[head], last[head].cpu())  # an average of several steps, not the last one
    assert load_checkpoint(run.out / "5head_best_fold0.pth")["config"]["train"]["ema_decay"] == 0.9


def test_without_ema_the_checkpoint_holds_the_last_weights(runs):
    run = runs["0"]
    (trainer,) = run.trainers
    assert trainer.ema is None
    saved = load_checkpoint(run.out / "5head_best_fold0.pth")["model"]
    torch.testing.assert_close(saved["heads.0.net.0.weight"], trainer.model.state_dict()["heads.0.net.0.weight"])


def test_ema_decay_out_of_range_is_refused(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--ema-decay", "1.0")
    assert run.rc == 2 and any("--ema-decay must be in [0, 1)" in m for m in run.log)
