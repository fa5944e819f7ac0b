"""Eval / predict options resolved as the run's own RunConfig: overrides with dataclasses.replace, contradictions
and bad values as RunErrors, and the options record of oof_metrics.json."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from biomass5head.infer.run_folder import RunError, open_run, resolve_options

RECORD_KEYS = ["tta", "derive_dead", "correction_threshold", "always_correct_dead", "apply_context_adjustment",
               "reconcile", "data_dir", "backbone", "grid", "img_size", "img_size_trained", "hidden_ratio",
               "batch_size", "num_workers", "prefetch_factor", "device", "amp_dtype", "feature_cache"]


@pytest.fixture(scope="module")
def run(tiny_run):
    return open_run(tiny_run)


def test_left_out_options_take_the_runs_values(run):
    opts = resolve_options(run, {})
    assert opts.cfg == replace(run.config, model=replace(run.config.model, grad_ckpt=False))
    assert opts.data_dir == run.config.data.base_path and opts.img_size_trained == run.config.model.img_size == 28
    assert opts.feature_cache is None  # the tiny run fine-tuned its backbone: pixels, not cached features
    assert (opts.tta, opts.derive_dead, opts.device) == (False, False, None)


def test_given_options_override_the_runs_config(run, tmp_path, caplog):
    given = {"data_dir": str(tmp_path), "batch_size": 2, "num_workers": 0, "img_size": 42, "tta": True,
             "derive_dead": True, "device": "cpu", "backbone": "vit_small_patch14_reg4_dinov2", "grid": [2, 2],
             "hidden_ratio": 0.5, "dropout": 0.3}
    with caplog.at_level(logging.INFO):
        opts = resolve_options(run, given)
    cfg = opts.cfg
    assert (cfg.data.base_path, cfg.data.batch_size, cfg.data.num_workers) == (str(tmp_path), 2, 0)
    assert cfg.model.img_size == 42 and opts.img_size_trained == 28
    assert cfg.model.backbone == run.config.model.backbone  # the run's full name (with its pretrained tag) stays
    assert cfg.post == run.config.post and cfg.train == run.config.train  # what inference never overrides
    assert "--img-size 42 differs from training (28)" in caplog.text and "--dropout 0.3 ignored" in caplog.text
    record = opts.record()
    assert list(record) == RECORD_KEYS
    assert record["tta"] and record["derive_dead"] and record["grid"] == [2, 2] and record["batch_size"] == 2


@pytest.mark.parametrize("given, words", [
    ({"grid": [1, 2]}, "--grid 1 2 contradicts the run in"),
    ({"hidden_ratio": 0.25}, "--hidden-ratio 0.25 contradicts"),
    ({"backbone": "vit_base_patch14_dinov2"}, "--backbone vit_base_patch14_dinov2 contradicts"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"num_workers": -1}, "--num-workers must be >= 0, got -1"),
    ({"img_size": 7}, "--img-size must be at least 14"),
])
def test_contradictions_and_bad_values_are_run_errors(run, given, words):
    with pytest.raises(RunError, match=words):
        resolve_options(run, given)


def test_values_a_run_did_not_record_take_the_eval_tables_defaults(tiny_run, tmp_path):
    """An older or hand-written config.json without --batch-size / --img-size: the eval table's 4 and 518 apply."""
    import json
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("oof_*", "submission.csv"))
    config = json.loads((run_dir / "config.json").read_text())
    del config["data"]["batch_size"], config["model"]["img_size"]
    (run_dir / "config.json").write_text(json.dumps(config))
    opts = resolve_options(open_run(run_dir), {})
    assert opts.cfg.data.batch_size == 4 and opts.cfg.model.img_size == 518 and opts.img_size_trained == 518
    assert opts.cfg.model.grid == tuple(config["model"]["grid"])  # what it did record is kept
