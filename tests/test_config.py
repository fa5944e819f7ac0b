"""Tests of config.py and the train parser (cli/train.py): every option of the reference with its default, the resolved
RunConfig, clipping and mode rules, and bad values refused with a message that names the option (also through
`main`, exit code 2)."""
from __future__ import annotations

import json
import logging

import pytest

from biomass5head.cli.train import build_parser, config_from_args
from biomass5head.config import ConfigError, RunConfig
from biomass5head.constants import TARGETS
from biomass5head.train.stages import plan_stages


def resolve(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


# Every training option of the reference (5head_arguments.md, "Training Script") with its documented default,
# as argparse stores it. `--train-folds` defaults to all folds of --num-folds (0 1 2 3 4 for the default 5).
# `--num-workers` is stored as None (left out) and resolved for the device: the reference's 4 on a GPU, fewer on a
# CPU (test_device.py pins both).
REFERENCE_DEFAULTS = {
    "base_path": "./data", "output_dir": None,
    "backbone": "vit_base_patch14_reg4_dinov2.lvd142m", "grid": [2, 2], "dropout": 0.2, "hidden_ratio": 0.5,
    "no_film": False, "no_attention_pool": False, "grad_ckpt": False,
    "epochs": 50, "batch_size": 8, "num_workers": None, "cache_images": False, "prefetch_factor": 4, "grad_accum": 1,
    "grad_clip": 1.0, "patience": 10,
    "lr": 2e-4, "backbone_lr": 1e-5, "weight_decay": 0.01, "warmup_epochs": 2,
    "two_stage": False, "freeze_epochs": 5, "head_lr_stage1": 1e-3, "freeze_backbone": False,
    "use_aux_heads": False, "aux_state_weight": 5.0, "aux_month_weight": 3.0, "aux_species_weight": 2.0,
    "apply_context_adjustment": False,
    "target_weights": [0.2] * 5, "constraint_weight": 0.05, "use_focal_loss": False, "use_dead_aware_loss": False,
    "no_huber_for_dead": False,
    "correction_threshold": 0.15, "always_correct_dead": False,
    "img_size": 518, "aug_prob": 0.5, "stereo_correct_aug": False, "stereo_swap_prob": 0.0,
    "use_log_target": False,
    "mixup_prob": 0.0, "mixup_alpha": 0.4, "cutmix_prob": 0.0, "cutmix_alpha": 1.0,
    "amp_dtype": "float16",
    "num_folds": 5, "cv_strategy": "group_month", "fold_csv": None,
    "device_type": None, "seed": 18,
}


def test_parser_has_every_reference_option_with_its_default():
    args = vars(build_parser().parse_args([]))
    for name, default in REFERENCE_DEFAULTS.items():
        assert name in args, f"--{name.replace('_', '-')} is missing"
        assert args[name] == default, f"--{name.replace('_', '-')}: default {args[name]!r}, reference {default!r}"
    # Extensions beyond the reference: offline weights.
    assert args["backbone_weights"] is None and args["no_pretrained"] is False


def test_parser_groups_follow_the_reference_order():
    titles = [g.title for g in build_parser()._action_groups][2:]  # after argparse's positional / options groups
    expected = ["Paths", "Model architecture", "Training configuration", "Learning rates", "2-stage training",
                "Auxiliary heads", "Loss function", "Post-processing", "Augmentation", "Target normalization",
                "MixUp/CutMix", "AMP", "Cross-validation", "Device & misc",
                "Stopping and resuming"]  # the last group is an extension: --resume, --save-every, --keep-last
    assert [t.split(" (")[0] for t in titles] == expected


def test_defaults_resolve_to_the_reference_configuration():
    cfg = resolve()
    assert cfg.model.backbone == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert cfg.model.grid == (2, 2) and cfg.model.img_size == 518 and cfg.model.film and cfg.model.attention_pool
    assert cfg.model.pretrained and cfg.model.backbone_weights is None
    assert cfg.data.train_folds == (0, 1, 2, 3, 4) and cfg.data.cv_strategy == "group_month"
    assert cfg.loss.target_weights == (0.2,) * 5 and cfg.loss.huber_for_dead
    assert cfg.train.mode == "single_stage" and cfg.train.warmup_epochs == 2 and cfg.train.freeze_epochs == 5
    assert cfg.output_dir is None and cfg.device_type is None and cfg.seed == 18


def test_every_option_reaches_the_config():
    cfg = resolve(
        "--base-path", "B", "--output-dir", "O", "--backbone", "vit_small_patch14_dinov2.lvd142m", "--grid", "1", "3",
        "--dropout", "0.3", "--hidden-ratio", "0.25", "--no-film", "--no-attention-pool", "--grad-ckpt",
        "--backbone-weights", "w.safetensors", "--epochs", "7", "--batch-size", "3", "--num-workers", "2",
        "--cache-images", "--prefetch-factor", "2", "--grad-accum", "4", "--grad-clip", "0.5", "--patience", "3",
        "--lr", "3e-4", "--backbone-lr", "2e-5", "--weight-decay", "0.05", "--warmup-epochs", "1", "--two-stage",
        "--freeze-epochs", "2", "--head-lr-stage1", "5e-4", "--use-aux-heads", "--aux-state-weight", "0.5",
        "--aux-month-weight", "0.4", "--aux-species-weight", "0.25", "--apply-context-adjustment",
        "--target-weights", "0.1", "0.1", "0.1", "0.2", "0.5", "--constraint-weight", "0.2", "--use-focal-loss",
        "--use-dead-aware-loss", "--no-huber-for-dead", "--correction-threshold", "0.3", "--always-correct-dead",
        "--reconcile",
        "--img-size", "224", "--aug-prob", "0.7", "--stereo-correct-aug", "--stereo-swap-prob", "0.5",
        "--use-log-target", "--mixup-prob", "0.2", "--mixup-alpha", "0.3", "--cutmix-prob", "0.1",
        "--cutmix-alpha", "0.8", "--amp-dtype", "bfloat16", "--num-folds", "4", "--train-folds", "1", "3",
        "--cv-strategy", "group_date_state_bin", "--fold-csv", "f.csv", "--device-type", "cpu", "--seed", "7",
        "--check-photos", "full", "--allow-any-aspect", "--save-every", "60", "--keep-last",
        "--select-on", "inner", "--inner-frac", "0.3", "--recipe", "robust", "--compile",
        "--tile-feature", "patch_mean", "--ema-decay", "0.99", "--interval-heads", "7", "--interval-weight", "0.4",
        "--scale-aug-prob", "0.3", "--scale-range", "0.6", "1.4", "--scale-pad", "grey", "--light-aug-prob", "0.2",
        "--head-seeds", "3",
        "--ridge-select", "holdout")
    assert cfg.to_dict() == {
        "model": {"backbone": "vit_small_patch14_dinov2.lvd142m", "grid": [1, 3], "img_size": 224, "dropout": 0.3,
                  "hidden_ratio": 0.25, "film": False, "attention_pool": False, "grad_ckpt": True,
                  "use_aux_heads": True, "pretrained": True, "backbone_weights": "w.safetensors",
                  "ridge_base": False,  # the robust recipe's ridge needs --freeze-backbone
                  "tile_feature": "patch_mean", "interval_heads": 7, "head_seeds": 3},
        "data": {"base_path": "B", "batch_size": 3, "num_workers": 2, "cache_images": True, "prefetch_factor": 2,
                 "num_folds": 4, "train_folds": [1, 3], "cv_strategy": "group_date_state_bin", "fold_csv": "f.csv",
                 "check_photos": "full", "allow_any_aspect": True},
        "aug": {"aug_prob": 0.7, "stereo_correct_aug": True, "stereo_swap_prob": 0.5, "mixup_prob": 0.2,
                "mixup_alpha": 0.3, "cutmix_prob": 0.1, "cutmix_alpha": 0.8, "scale_aug_prob": 0.3,
                "scale_range": [0.6, 1.4], "scale_pad": "grey", "light_aug_prob": 0.2},
        "loss": {"target_weights": [0.1, 0.1, 0.1, 0.2, 0.5], "constraint_weight": 0.2, "use_focal_loss": True,
                 "use_dead_aware_loss": True, "huber_for_dead": False, "aux_state_weight": 0.5,
                 "aux_month_weight": 0.4, "aux_species_weight": 0.25, "use_log_target": True,
                 "target_transform": None,  # --use-log-target given: the recipe's sqrt yields to it
                 "interval_weight": 0.4},
        "post": {"correction_threshold": 0.3, "always_correct_dead": True, "apply_context_adjustment": True,
                 "reconcile": True},
        "cache": {"enabled": True, "dir": None, "bank": 4},
        "train": {"epochs": 7, "grad_accum": 4, "grad_clip": 0.5, "patience": 3, "lr": 3e-4, "backbone_lr": 2e-5,
                  "weight_decay": 0.05, "warmup_epochs": 1, "two_stage": True, "freeze_epochs": 2,
                  "head_lr_stage1": 5e-4, "freeze_backbone": False, "amp_dtype": "bfloat16", "save_every": 60.0,
                  "keep_last": True, "select_on": "inner", "inner_frac": 0.3, "compile": True,
                  "ema_decay": 0.99, "refit": True,  # (from the robust recipe)
                  "ridge_select": "holdout"},  # given: wins over the recipe's cv
        "output_dir": "O", "device_type": "cpu", "seed": 7, "recipe": "robust",
    }


def test_to_dict_is_plain_json_and_round_trips():
    cfg = resolve("--grid", "1", "2", "--train-folds", "0", "2", "--use-aux-heads")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # lists, not tuples: identical to what config.json gives back
    assert RunConfig.from_dict(d) == cfg
    assert RunConfig.from_dict({**d, "an_old_key": 1}) == cfg


def test_default_train_folds_follow_num_folds():
    assert resolve("--num-folds", "3").data.train_folds == (0, 1, 2)
    assert resolve("--num-folds", "3", "--train-folds", "2").data.train_folds == (2,)


@pytest.mark.parametrize("argv, expected", [
    ([], [("single", 50, True, 2e-4, 1e-5)]),
    (["--two-stage"], [("stage1", 5, False, 1e-3, None), ("stage2", 45, True, 2e-4, 1e-5)]),
    (["--freeze-backbone"], [("head_only", 50, False, 1e-3, None)]),
    (["--freeze-backbone", "--two-stage", "--head-lr-stage1", "3e-4"], [("head_only", 50, False, 3e-4, None)]),
    (["--two-stage", "--freeze-epochs", "0"], [("stage2", 50, True, 2e-4, 1e-5)]),
    (["--two-stage", "--epochs", "3", "--freeze-epochs", "5"], [("stage1", 3, False, 1e-3, None)]),
])
def test_training_modes_plan_their_stages(argv, expected):
    stages = plan_stages(resolve(*argv))
    assert [(s.name, s.epochs, s.backbone_trainable, s.head_lr, s.backbone_lr) for s in stages] == expected


def test_freeze_backbone_wins_over_two_stage_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = resolve("--freeze-backbone", "--two-stage")
    assert cfg.train.mode == "head_only"
    assert "--freeze-backbone wins over --two-stage" in caplog.text


def test_long_freeze_and_warmup_are_clipped_to_epochs_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = resolve("--epochs", "1", "--two-stage", "--freeze-epochs", "5", "--warmup-epochs", "5")
    assert cfg.train.freeze_epochs == 1 and cfg.train.warmup_epochs == 1
    assert "--freeze-epochs 5 is longer than --epochs 1" in caplog.text
    assert "--warmup-epochs 5 is longer than --epochs 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cfg = resolve("--epochs", "4", "--two-stage", "--freeze-epochs", "3", "--warmup-epochs", "4")
    assert cfg.train.freeze_epochs == 3 and cfg.train.warmup_epochs == 4 and caplog.text == ""


# (arguments, text the error must contain): every bad value is refused, naming its option.
BAD_VALUES = [
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--dropout", "0.9"], "--dropout"),
    (["--dropout", "-0.1"], "--dropout"),
    (["--dropout", "nan"], "--dropout"),
    (["--hidden-ratio", "0"], "--hidden-ratio"),
    (["--grid", "0", "2"], "--grid"),
    (["--img-size", "0"], "--img-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--prefetch-factor", "0"], "--prefetch-factor"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--patience", "0"], "--patience"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--backbone-lr=-1e-5"], "--backbone-lr"),
    (["--head-lr-stage1", "0"], "--head-lr-stage1"),
    (["--weight-decay", "-0.01"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--freeze-epochs", "-2"], "--freeze-epochs"),
    (["--aux-state-weight", "-1"], "--aux-state-weight"),
    (["--aux-month-weight", "nan"], "--aux-month-weight"),
    (["--aux-species-weight", "-0.5"], "--aux-species-weight"),
    (["--apply-context-adjustment"], "--use-aux-heads"),
    (["--target-weights", "0.2", "0.2", "0.2", "0.2", "-0.2"], "--target-weights"),
    (["--target-weights", "0", "0", "0", "0", "0"], "--target-weights"),
    (["--target-weights", "0.2", "0.2", "inf", "0.2", "0.2"], "--target-weights"),
    (["--constraint-weight", "-0.05"], "--constraint-weight"),
    (["--correction-threshold", "-0.1"], "--correction-threshold"),
    (["--aug-prob", "1.5"], "--aug-prob"),
    (["--stereo-swap-prob", "-0.1"], "--stereo-swap-prob"),
    (["--mixup-prob", "1.2"], "--mixup-prob"),
    (["--cutmix-prob", "2"], "--cutmix-prob"),
    (["--mixup-prob", "0.6", "--cutmix-prob", "0.6"], "--mixup-prob + --cutmix-prob"),
    (["--mixup-alpha", "0"], "--mixup-alpha"),
    (["--cutmix-alpha", "-1"], "--cutmix-alpha"),
    (["--num-folds", "1"], "--num-folds"),
    (["--train-folds", "7"], "--train-folds"),
    (["--train-folds", "-1"], "--train-folds"),
    (["--train-folds", "0", "0"], "--train-folds"),
    (["--num-folds", "3", "--train-folds", "3"], "--train-folds"),
    (["--seed", "-1"], "--seed"),
    (["--no-pretrained", "--backbone-weights", "w.pth"], "--backbone-weights"),
    (["--inner-frac", "0.7"], "--inner-frac"),
    (["--inner-frac", "0"], "--inner-frac"),
    (["--use-log-target", "--target-transform", "sqrt"], "--target-transform sqrt"),
    (["--ridge-base"], "--ridge-base needs --freeze-backbone"),
    (["--ridge-base", "--freeze-backbone", "--no-feature-cache"], "--ridge-base fits its ridge on the frozen-feature"),
]


@pytest.mark.parametrize("argv, option", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_the_option(argv, option):
    with pytest.raises(ConfigError) as err:
        resolve(*argv)
    assert option in str(err.value)


@pytest.mark.parametrize("argv, option", [
    (["--epochs", "-1"], "--epochs"),
    (["--dropout", "0.9"], "--dropout"),
    (["--aug-prob", "1.5"], "--aug-prob"),
    (["--train-folds", "7"], "--train-folds"),
    (["--apply-context-adjustment"], "--apply-context-adjustment"),
])
def test_main_refuses_bad_values_with_exit_code_2(tmp_path, capsys, argv, option):
    from biomass5head.cli.train import main

    out = tmp_path / "run"
    assert main(["--base-path", str(tmp_path / "no_data"), "--output-dir", str(out), *argv]) == 2
    assert option in capsys.readouterr().out
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("argv, option", [
    (["--amp-dtype", "float64"], "--amp-dtype"),
    (["--cv-strategy", "by_moon"], "--cv-strategy"),
    (["--device-type", "tpu"], "--device-type"),
    (["--epochs", "ten"], "--epochs"),
    (["--grid", "2"], "--grid"),
    (["--target-weights", "1", "1"], "--target-weights"),
])
def test_parser_rejects_malformed_values_with_exit_code_2(capsys, argv, option):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_target_weights_follow_the_target_order():
    cfg = resolve("--target-weights", "1", "2", "3", "4", "5")
    assert dict(zip(TARGETS, cfg.loss.target_weights, strict=True))["Dry_Total_g"] == 5.0


def test_help_lists_every_option():
    text = build_parser().format_help()
    for name in [*REFERENCE_DEFAULTS, "backbone_weights", "no_pretrained", "train_folds"]:
        assert "--" + name.replace("_", "-") in text
