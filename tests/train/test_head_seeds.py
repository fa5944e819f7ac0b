"""`--head-seeds K`: K independently initialised copies of the heads on one backbone; each is trained on its own
loss and the model predicts their mean (a seed ensemble in one checkpoint)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from spied_run import digest, train

from biomass5head.cli.eval import main as eval_main
from biomass5head.cli.export import main as export_main
from biomass5head.config import ConfigError, ModelConfig
from biomass5head.model.five_head import FiveHeadModel
from biomass5head.model.targets import TargetTransform
from biomass5head.train.losses import BiomassLoss


class Stub(torch.nn.Module):
    num_features = 8


def test_copies_start_apart_and_the_prediction_is_their_mean():
    torch.manual_seed(0)
    model = FiveHeadModel(Stub(), head_seeds=3).eval()
    single = FiveHeadModel(Stub())
    assert len(model.copies) == 2 and single.copies is None
    heads = [model.heads] + [c.heads for c in model.copies]
    assert len({digest(h) for h in heads}) == 3  # three different initialisations
    n_heads = sum(p.numel() for n, p in single.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == 3 * n_heads
    left, right = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    with torch.no_grad():
        out = model.forward_features(left, right)
    assert out["members"].shape == (3, 4, 5)
    torch.testing.assert_close(out["reg"], out["members"].mean(0))
    assert "members" not in single.forward_features(left, right)


def test_each_copy_is_scored_on_its_own():
    grams = np.abs(np.random.default_rng(0).normal(30, 10, (6, 5)))
    tf = TargetTransform.fit(grams, kind="sqrt")
    loss = BiomassLoss(tf)
    target = tf.encode(torch.as_tensor(grams, dtype=torch.float32))
    members = target + 0.3 * torch.randn(3, *target.shape)
    total, terms = loss(members, target)
    each = [loss(m, target)[0] for m in members]
    torch.testing.assert_close(total, torch.stack(each).mean())
    assert total > loss(members.mean(0), target)[0]  # not the loss of the mean: the copies stay independent


def test_head_seeds_must_be_positive():
    with pytest.raises(ConfigError, match="--head-seeds must be 1-32"):
        ModelConfig(head_seeds=0)


@pytest.mark.slow  # a training run, eval and an ONNX export (5-10 s)
def test_a_run_trains_every_copy_and_eval_and_export_read_its_checkpoint(tiny_data, tmp_path_factory, capsys):
    run = train(tmp_path_factory, tiny_data, "--head-seeds", "3", "--freeze-backbone", "--ridge-base",
                "--aug-prob", "0", "--epochs", "2")
    assert run.rc == 0 and run.config["model"]["head_seeds"] == 3
    weights = run.ckpt()["model"]
    last = [k for k in weights if k.endswith("net.3.weight")]  # each head's last layer: zero at the start
    assert len(last) == 3 * 5 and {k.split(".")[0] for k in last} == {"heads", "copies"}
    assert all(weights[k].abs().sum() > 0 for k in last)  # every copy of every head was trained
    assert eval_main(["--model-dir", str(run.out), "--device", "cpu"]) == 0
    assert (run.out / "oof_predictions.csv").is_file()
    onnx = run.out.parent / "model.onnx"
    assert export_main(["--model-dir", str(run.out), "--out", str(onnx)]) == 0  # the copies' mean, in one graph
    diff = float(re.search(r"max relative difference ONNX Runtime vs PyTorch: (\S+)", capsys.readouterr().out)[1])
    assert diff < 1e-3
