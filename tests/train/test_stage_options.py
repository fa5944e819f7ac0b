"""Frozen, two-stage and single-stage training and the precision each CPU gets, by their effect on a run."""
from __future__ import annotations

import math

import pytest
import torch
from spied_run import (
    CPU_AVX2,
    FAST_ARGS,
    lr_groups,
    train,
)


def test_freeze_backbone_trains_heads_only_at_head_lr_stage1(head_only_run):
    run = head_only_run
    assert run.rc == 0
    assert "--freeze-backbone wins over --two-stage" in run.log_text
    (opt,) = run.optimizers
    assert opt["stage"] == "head_only"
    assert lr_groups(opt) == {("head", 0.05): 3e-4, ("head", 0.0): 3e-4}
    log = run.log_df()
    assert log["stage"].tolist() == ["head_only"] * 2
    assert log["lr_head"].iloc[0] == pytest.approx(3e-4) and (log["lr_backbone"] == 0).all()
    for epoch in run.epochs:
        assert epoch["backbone_requires_grad"] == {False}
        assert epoch["before"]["backbone"] == epoch["after"]["backbone"]
        assert epoch["before"]["heads"] != epoch["after"]["heads"]
    # a frozen backbone stays in eval mode (no dropout / drop-path) while the heads train
    assert {(f["training"], f["backbone_training"]) for f in run.train_forwards()} == {(True, False)}


def test_freeze_backbone_keeps_the_weights_file_bit_identical(head_only_run, weights_file):
    from safetensors.torch import load_file

    start = load_file(weights_file)
    ckpt = head_only_run.ckpt()
    backbone = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    assert set(backbone) == set(start)
    for k, v in start.items():
        assert torch.equal(backbone[k], v), k
    assert ckpt["config"]["model"]["backbone_weights"] == str(weights_file)


def test_two_stage_unfreezes_after_freeze_epochs(two_stage_run):
    run = two_stage_run
    assert run.rc == 0
    stage1, stage2 = run.optimizers
    assert stage1["stage"] == "stage1" and lr_groups(stage1) == {("head", 0.02): 3e-3, ("head", 0.0): 3e-3}
    assert stage2["stage"] == "stage2" and lr_groups(stage2) == {
        ("head", 0.02): 4e-4, ("head", 0.0): 4e-4, ("backbone", 0.02): 2e-5, ("backbone", 0.0): 2e-5}
    first, second = run.epochs
    assert first["backbone_requires_grad"] == {False} and first["before"]["backbone"] == first["after"]["backbone"]
    assert second["backbone_requires_grad"] == {True} and second["before"]["backbone"] != second["after"]["backbone"]
    log = run.log_df()
    assert log["stage"].tolist() == ["stage1", "stage2"]
    assert log["lr_head"].tolist() == pytest.approx([3e-3, 4e-4])
    assert log["lr_backbone"].tolist() == pytest.approx([0.0, 2e-5])


def test_freeze_epochs_longer_than_epochs_is_clipped(two_stage_clipped_run):
    run = two_stage_clipped_run
    assert run.rc == 0
    assert "--freeze-epochs 5 is longer than --epochs 2: clipped to 2" in run.log_text
    assert run.config["train"]["freeze_epochs"] == 2
    assert run.log_df()["stage"].tolist() == ["stage1", "stage1"]
    assert all(e["before"]["backbone"] == e["after"]["backbone"] for e in run.epochs)


# --------------------------------------------------------------------------------------------------------------
# AMP
# --------------------------------------------------------------------------------------------------------------
def test_amp_float16_on_a_cpu_with_native_bfloat16_uses_bfloat16(two_stage_clipped_run):
    run = two_stage_clipped_run
    assert "INFO precision: bfloat16 autocast (float16 matmuls are slow on CPUs; this CPU has native bfloat16: " \
           "AMX-BF16/AVX512-BF16)" in run.log
    assert "WARNING" not in run.log_text.replace("WARNING --freeze-epochs", "")
    assert {(f["autocast"], f["dtype"]) for f in run.forwards} == {(True, torch.bfloat16)}
    assert run.config["train"]["amp_dtype"] == "float16"
    assert {k: run.config["runtime"][k] for k in ("amp_dtype_requested", "amp_dtype_used", "cpu_native_bf16")} == {
        "amp_dtype_requested": "float16", "amp_dtype_used": "bfloat16", "cpu_native_bf16": True}


@pytest.mark.parametrize("given", [[], ["--amp-dtype", "float16"]])
def test_amp_default_on_a_cpu_without_native_bfloat16_is_float32(tiny_data, tmp_path_factory, given):
    at = FAST_ARGS.index("--amp-dtype")
    run = train(tmp_path_factory, tiny_data, *given, cpu=CPU_AVX2, base_args=FAST_ARGS[:at] + FAST_ARGS[at + 2:])
    assert run.rc == 0
    assert {f["autocast"] for f in run.forwards} == {False}
    assert not [m for m in run.log if m.startswith("WARNING") and ("amp" in m or "bfloat16" in m)]
    assert any(m.startswith("INFO precision: float32 (no native bfloat16 on this CPU (the CPU has neither AMX-BF16 "
                            "nor AVX512-BF16; capability AVX2)") for m in run.log)
    assert run.config["train"]["amp_dtype"] == "float16"  # what was asked for ...
    assert run.config["runtime"]["amp_dtype_used"] == "float32"  # ... and what ran
    assert run.ckpt()["config"]["runtime"] == run.config["runtime"]


def test_explicit_bfloat16_on_a_cpu_without_native_bfloat16_runs_with_a_warning(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--amp-dtype", "bfloat16", cpu=CPU_AVX2)
    assert run.rc == 0
    assert {(f["autocast"], f["dtype"]) for f in run.forwards} == {(True, torch.bfloat16)}
    warning = next(m for m in run.log if m.startswith("WARNING --amp-dtype"))
    assert "--amp-dtype bfloat16 on a CPU without native bfloat16" in warning and "slower than float32" in warning
    assert run.config["runtime"]["amp_dtype_used"] == "bfloat16"


def test_amp_float32_turns_autocast_off(default_run):
    assert {f["autocast"] for f in default_run.forwards} == {False}
    assert "--amp-dtype" not in default_run.log_text


def test_two_stage_restarts_warmup_and_patience_in_stage_2(tiny_data, tmp_path_factory):
    """Scripted scores: stage 1 ends with 2 epochs without improvement (= --patience 2); carried over, that count
    would skip stage 2 entirely. Each stage's first epoch starts its own warmup at 1/6 of its LR (6 steps)."""
    run = train(tmp_path_factory, tiny_data, "--two-stage", "--freeze-epochs", "3", "--epochs", "7",
                "--patience", "2", "--warmup-epochs", "1", "--head-lr-stage1", "1e-3", "--lr", "2e-4",
                "--backbone-lr", "1e-5", scores=[0.5, 0.4, 0.3, 0.45, 0.6, 0.55, 0.5])
    assert run.rc == 0
    log = run.log_df()
    assert log["stage"].tolist() == ["stage1"] * 3 + ["stage2"] * 4
    assert log["best"].tolist() == [True, False, False, False, True, False, False]
    assert run.ckpt()["epoch"] == 4
    assert log["lr_head"][0] == pytest.approx(1e-3 / 6) and log["lr_backbone"][0] == 0
    assert log["lr_head"][3] == pytest.approx(2e-4 / 6) and log["lr_backbone"][3] == pytest.approx(1e-5 / 6)
    # stage 1: 3 epochs x 6 steps, warmup 6 steps, then cosine over the other 12
    assert log["lr_head"][1] == pytest.approx(1e-3)
    assert log["lr_head"][2] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 6 / 12))))
