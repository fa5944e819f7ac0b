"""Every train_5head option, shown by its effect on a real run of `biomass5head.cli.train.main`.

The runs use timm's `test_vit` (a real ViT: 0.3 M parameters, patch 16, D = 64, random initialisation) on 32 px
tiles so that each one takes about a second on a CPU; `tests/test_train_e2e.py` runs the reference's commands
with ViT-S/14. Spies record what the run did (trainers, optimiser groups, backbone digests per epoch,
validation predictions, model inputs and autocast state, gradient clipping, photo decoding) without changing it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import biomass5head.cli.train
import biomass5head.data.datasets
import biomass5head.device
import biomass5head.model.five_head
import biomass5head.train.run
import biomass5head.train.trainer
from biomass5head.cli.train import build_parser, config_from_args
from biomass5head.config import RunConfig
from biomass5head.constants import TARGETS
from biomass5head.data.datasets import BiomassDataset
from biomass5head.data.folds import make_folds
from biomass5head.data.images import TileSpec
from biomass5head.data.tables import load_train
from biomass5head.device import CpuInfo
from biomass5head.metrics import compute_metrics
from biomass5head.model.backbone import create_backbone
from biomass5head.model.postprocess import apply_postprocess, compute_context_ratios, correct_dead, derive_dead
from biomass5head.model.targets import TargetTransform

FAST_BACKBONE = "test_vit"
FAST_ARGS = ["--backbone", FAST_BACKBONE, "--img-size", "32", "--grid", "1", "1", "--batch-size", "4",
             "--num-workers", "0", "--device-type", "cpu", "--amp-dtype", "float32", "--train-folds", "0",
             "--epochs", "1"]
N_TRAIN_FOLD0 = 24  # tiny_data: 30 images; fold 0 of group_month with seed 18 holds the other 6
LOG_TIMING = ("seconds", "samples_per_s")
# Stand-ins for the two kinds of CPU the numeric path depends on.
CPU_AMX = CpuInfo(cores=2, capability="AVX512", native_bf16=True, bf16_reason="AMX-BF16/AVX512-BF16")
CPU_AVX2 = CpuInfo(cores=2, capability="AVX2", native_bf16=False,
                   bf16_reason="the CPU has neither AMX-BF16 nor AVX512-BF16")


def digest(module: torch.nn.Module | None) -> str | None:
    """sha256 of a module's parameters and buffers: equal digests mean bit-identical weights."""
    if module is None:
        return None
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.levelname} {record.getMessage()}")


@dataclass
class Run:
    """A finished `main` call and what the spies saw."""
    out: Path
    rc: int = -1
    log: list[str] = field(default_factory=list)
    trainers: list = field(default_factory=list)
    optimizers: list[dict] = field(default_factory=list)  # per stage: name and param groups at creation
    epochs: list[dict] = field(default_factory=list)  # per train_one_epoch: digests before/after, flags
    preds: list[dict] = field(default_factory=list)  # per validation: pred/true grams, probs
    forwards: list[dict] = field(default_factory=list)  # per model call: input shape, autocast, modes
    clips: list[float] = field(default_factory=list)  # max_norm of each clip_grad_norm_ call
    loads: list[tuple] = field(default_factory=list)  # (path, grid, img_size) of each photo decode
    grad_ckpt_calls: int = 0

    @property
    def log_text(self) -> str:
        return "\n".join(self.log)

    def ckpt(self, fold: int = 0) -> dict:
        return torch.load(self.out / f"5head_best_fold{fold}.pth", map_location="cpu", weights_only=True)

    def log_df(self, fold: int = 0) -> pd.DataFrame:
        return pd.read_csv(self.out / f"log_fold{fold}.csv")

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    @property
    def config(self) -> dict:
        return json.loads((self.out / "config.json").read_text())

    def train_forwards(self) -> list[dict]:
        return [f for f in self.forwards if f["training"]]


def train(tmp_path_factory, data: Path, *args: str, scores: list[float] | None = None, out: Path | None = None,
          output_dir: bool = True, cpu: CpuInfo | None = None, base_args: list[str] = FAST_ARGS) -> Run:
    """Run main(FAST_ARGS + args) with spies; `scores` replaces the post-processed validation score per epoch;
    `cpu` stands in for the CPU the run detects (native bfloat16 or not)."""
    out = out or tmp_path_factory.mktemp("opt") / "run"
    argv = ["--base-path", str(data), *base_args, *args]
    if "--backbone-weights" not in args:
        argv.append("--no-pretrained")
    if output_dir:
        argv += ["--output-dir", str(out)]
    run = Run(out)
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            _install_spies(mp, run, scores)
            if cpu is not None:
                mp.setattr(biomass5head.device, "cpu_info", lambda: cpu)
            run.rc = biomass5head.cli.train.main(argv)
    finally:
        logging.getLogger().removeHandler(handler)
    run.log = handler.messages
    return run


def _install_spies(mp: pytest.MonkeyPatch, run: Run, scores) -> None:
    class RecordingTrainer(biomass5head.train.trainer.FoldTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            run.trainers.append(self)

    build_optimizer = biomass5head.train.trainer.build_optimizer

    def spy_build_optimizer(model, stage, weight_decay):
        opt = build_optimizer(model, stage, weight_decay)
        run.optimizers.append({"stage": stage.name, "groups": [
            {"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"], "params": list(g["params"])}
            for g in opt.param_groups]})
        return opt

    train_one_epoch = biomass5head.train.trainer.train_one_epoch

    def spy_train_one_epoch(model, loader, loss_fn, *a, **kw):
        before = {"backbone": digest(model.backbone), "heads": digest(model.heads), "aux": digest(model.aux_heads)}
        requires_grad = {p.requires_grad for p in model.backbone.parameters()}
        result = train_one_epoch(model, loader, loss_fn, *a, **kw)
        after = {"backbone": digest(model.backbone), "heads": digest(model.heads), "aux": digest(model.aux_heads)}
        run.epochs.append({"before": before, "after": after, "backbone_requires_grad": requires_grad,
                           "loss_fn": loss_fn, "loader": loader})
        return result

    predict_ = biomass5head.train.trainer.predict

    def spy_predict(*a, **kw):
        out = predict_(*a, **kw)
        run.preds.append({"pred": out["pred"].copy(), "true": out["true"].copy(),
                          "probs": {h: p.copy() for h, p in out["probs"].items()}})
        return out

    forward = biomass5head.model.five_head.FiveHeadModel.forward

    def record_forward(model, left, right, cached: bool):
        run.forwards.append({"shape": tuple(left.shape), "right_shape": tuple(right.shape),
                             "autocast": torch.is_autocast_enabled("cpu"),
                             "dtype": torch.get_autocast_dtype("cpu"), "training": model.training,
                             "backbone_training": model.backbone.training, "cached": cached})

    in_forward = []

    def spy_forward(self, left, right):
        record_forward(self, left, right, cached=False)
        in_forward.append(True)
        try:
            return forward(self, left, right)
        finally:
            in_forward.pop()

    forward_features = biomass5head.model.five_head.FiveHeadModel.forward_features

    def spy_forward_features(self, left_feats, right_feats):
        if not in_forward:  # called directly: a batch of cached features skips the backbone
            record_forward(self, left_feats, right_feats, cached=True)
        return forward_features(self, left_feats, right_feats)

    clip = torch.nn.utils.clip_grad_norm_

    def spy_clip(params, max_norm, *a, **kw):
        run.clips.append(float(max_norm))
        return clip(params, max_norm, *a, **kw)

    load_views = biomass5head.data.datasets.load_views

    def spy_load_views(path, grid, img_size):
        run.loads.append((str(path), tuple(grid), int(img_size)))
        return load_views(path, grid=grid, img_size=img_size)

    checkpoint = torch.utils.checkpoint.checkpoint

    def spy_checkpoint(*a, **kw):
        run.grad_ckpt_calls += 1
        return checkpoint(*a, **kw)

    mp.setattr(biomass5head.train.run, "FoldTrainer", RecordingTrainer)
    mp.setattr(biomass5head.train.trainer, "build_optimizer", spy_build_optimizer)
    mp.setattr(biomass5head.train.trainer, "train_one_epoch", spy_train_one_epoch)
    mp.setattr(biomass5head.train.trainer, "predict", spy_predict)
    mp.setattr(biomass5head.model.five_head.FiveHeadModel, "forward", spy_forward)
    mp.setattr(biomass5head.model.five_head.FiveHeadModel, "forward_features", spy_forward_features)
    mp.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    mp.setattr(biomass5head.data.datasets, "load_views", spy_load_views)
    mp.setattr(torch.utils.checkpoint, "checkpoint", spy_checkpoint)
    if scores is not None:
        validate = biomass5head.train.trainer.FoldTrainer.validate
        calls = iter(scores)

        def scripted_validate(self, loader=None):
            val = validate(self, loader)
            val["post"]["weighted_r2"] = next(calls)
            return val

        mp.setattr(biomass5head.train.trainer.FoldTrainer, "validate", scripted_validate)


def fold0_frames(data: Path, seed: int = 18) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = load_train(data)
    folds = make_folds(df, "group_month", 5, seed)
    return df[folds != 0].reset_index(drop=True), df[folds == 0].reset_index(drop=True)


def head_keys(ckpt: dict, prefix: str) -> list[str]:
    return [k for k in ckpt["model"] if k.startswith(prefix)]


# --------------------------------------------------------------------------------------------------------------
# Shared runs (one per configuration; several tests look at each)
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(tiny_data, tmp_path_factory) -> Run:
    """Every option at its default except the FAST_ARGS, two epochs."""
    return train(tmp_path_factory, tiny_data, "--epochs", "2")


@pytest.fixture(scope="module")
def arch_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--no-film", "--no-attention-pool", "--dropout", "0.1",
                 "--hidden-ratio", "0.25", "--grid", "1", "2", "--img-size", "48", "--grad-ckpt", "--grad-clip", "0")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A backbone weights file for test_vit whose tensors are known."""
    torch.manual_seed(1234)
    state = {k: v.contiguous() for k, v in create_backbone(FAST_BACKBONE, 32, pretrained=False).state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def head_only_run(tiny_data, tmp_path_factory, weights_file) -> Run:
    return train(tmp_path_factory, tiny_data, "--freeze-backbone", "--two-stage", "--backbone-weights",
                 str(weights_file), "--head-lr-stage1", "3e-4", "--lr", "5e-4", "--backbone-lr", "7e-5",
                 "--weight-decay", "0.05", "--warmup-epochs", "0", "--epochs", "2")


@pytest.fixture(scope="module")
def two_stage_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--two-stage", "--epochs", "2", "--freeze-epochs", "1",
                 "--warmup-epochs", "0", "--head-lr-stage1", "3e-3", "--lr", "4e-4", "--backbone-lr", "2e-5",
                 "--weight-decay", "0.02")


@pytest.fixture(scope="module")
def two_stage_clipped_run(tiny_data, tmp_path_factory) -> Run:
    """The reference's default --amp-dtype float16 on a CPU with native bfloat16."""
    return train(tmp_path_factory, tiny_data, "--two-stage", "--epochs", "2", "--freeze-epochs", "5",
                 "--amp-dtype", "float16", cpu=CPU_AMX)


@pytest.fixture(scope="module")
def aux_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--use-aux-heads", "--apply-context-adjustment",
                 "--aux-state-weight", "5", "--aux-month-weight", "0", "--aux-species-weight", "2",
                 "--correction-threshold", "1e9")


@pytest.fixture(scope="module")
def loss_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--target-weights", "0.1", "0.1", "0.1", "0.2", "0.5",
                 "--constraint-weight", "0", "--use-focal-loss", "--use-dead-aware-loss", "--no-huber-for-dead",
                 "--always-correct-dead")


# --------------------------------------------------------------------------------------------------------------
# Files, checkpoints, configuration
# --------------------------------------------------------------------------------------------------------------
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
         str(default_run.out)]))
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


# --------------------------------------------------------------------------------------------------------------
# Model architecture
# --------------------------------------------------------------------------------------------------------------
def test_film_and_attention_pool_are_on_by_default(default_run):
    ckpt = default_run.ckpt()
    assert head_keys(ckpt, "film.") and head_keys(ckpt, "pool.")


def test_no_film_and_no_attention_pool_remove_their_parameters(arch_run):
    assert arch_run.rc == 0
    ckpt = arch_run.ckpt()
    assert head_keys(ckpt, "film.") == [] and head_keys(ckpt, "pool.") == []
    model = arch_run.trainers[0].model
    assert model.film is None and model.pool is None


def test_dropout_and_hidden_ratio_reach_the_model(default_run, arch_run):
    # hidden = 2 x D x ratio with D = 64 for test_vit
    assert tuple(default_run.ckpt()["model"]["proj.1.weight"].shape) == (64, 128)
    assert tuple(arch_run.ckpt()["model"]["proj.1.weight"].shape) == (32, 128)
    for run, p in ((default_run, 0.2), (arch_run, 0.1)):
        model = run.trainers[0].model
        drops = [m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)
                 and not name.startswith("backbone.")]
        assert len(drops) == 6 and set(drops) == {p}  # projection + five heads


def test_grid_and_img_size_reach_decoding_and_the_model(default_run, arch_run):
    assert {f["shape"][1:] for f in default_run.forwards} == {(1, 3, 32, 32)}
    assert {f["shape"][1:] for f in arch_run.forwards} == {(2, 3, 48, 48)}  # --grid 1 2: two tiles per view
    assert all(f["right_shape"] == f["shape"] for f in arch_run.forwards)
    assert {(g, s) for _, g, s in arch_run.loads} == {((1, 2), 48)}
    assert arch_run.config["model"]["grid"] == [1, 2]


def test_grad_ckpt_checkpoints_the_backbone_blocks(default_run, arch_run):
    assert arch_run.trainers[0].model.backbone.grad_checkpointing
    assert arch_run.grad_ckpt_calls > 0
    assert not default_run.trainers[0].model.backbone.grad_checkpointing
    assert default_run.grad_ckpt_calls == 0


def test_non_register_backbone_trains(tiny_data, tmp_path_factory):
    name = "vit_small_patch14_dinov2.lvd142m"
    run = train(tmp_path_factory, tiny_data, "--backbone", name, "--img-size", "28", "--freeze-backbone",
                "--batch-size", "8")
    assert run.rc == 0
    ckpt = run.ckpt()
    assert ckpt["config"]["model"]["backbone"] == name
    backbone_keys = {k[len("backbone."):] for k in ckpt["model"] if k.startswith("backbone.")}
    assert backbone_keys == set(create_backbone(name, 28, pretrained=False).state_dict())
    assert "reg_token" not in backbone_keys
    assert tuple(ckpt["model"]["proj.1.weight"].shape) == (384, 768)  # ViT-S: D = 384


def test_img_size_not_a_multiple_of_the_patch_is_a_clear_error(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = biomass5head.cli.train.main(["--base-path", str(tiny_data), "--output-dir", str(out), "--backbone",
                               "vit_small_patch14_reg4_dinov2.lvd142m", "--no-pretrained", "--img-size", "30",
                               "--device-type", "cpu"])
    assert rc == 2
    text = capsys.readouterr().out
    assert "--img-size 30" in text and "patch size 14" in text
    assert not out.exists()


def test_missing_pretrained_weights_offline_is_a_clear_error(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    out = tmp_path / "run"
    rc = biomass5head.cli.train.main(["--base-path", str(tiny_data), "--output-dir", str(out),
                                      "--backbone", FAST_BACKBONE, "--img-size", "32", "--device-type", "cpu"])
    assert rc == 2
    text = capsys.readouterr().out
    assert "--backbone-weights" in text and "--no-pretrained" in text
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# Training configuration
# --------------------------------------------------------------------------------------------------------------
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
    pd.testing.assert_frame_equal(_comparable(run), _comparable(again))


# --------------------------------------------------------------------------------------------------------------
# Learning rates and training modes
# --------------------------------------------------------------------------------------------------------------
def _groups(opt: dict) -> dict[tuple[str, float], float]:
    """{(group name, weight decay): lr} of an optimiser recorded at creation."""
    return {(g["name"], g["weight_decay"]): g["lr"] for g in opt["groups"]}


def _param_ids(opt: dict, name: str) -> set[int]:
    return {id(p) for g in opt["groups"] if g["name"] == name for p in g["params"]}


def test_single_stage_uses_lr_backbone_lr_and_weight_decay(default_run):
    (opt,) = default_run.optimizers
    assert opt["stage"] == "single"
    assert _groups(opt) == {("head", 0.01): 2e-4, ("head", 0.0): 2e-4, ("backbone", 0.01): 1e-5,
                            ("backbone", 0.0): 1e-5}
    model = default_run.trainers[0].model
    assert _param_ids(opt, "backbone") == {id(p) for p in model.backbone.parameters()}
    assert _param_ids(opt, "head") == {id(p) for p in model.head_parameters()}
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


def test_freeze_backbone_trains_heads_only_at_head_lr_stage1(head_only_run):
    run = head_only_run
    assert run.rc == 0
    assert "--freeze-backbone wins over --two-stage" in run.log_text
    (opt,) = run.optimizers
    assert opt["stage"] == "head_only"
    assert _groups(opt) == {("head", 0.05): 3e-4, ("head", 0.0): 3e-4}
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
    assert stage1["stage"] == "stage1" and _groups(stage1) == {("head", 0.02): 3e-3, ("head", 0.0): 3e-3}
    assert stage2["stage"] == "stage2" and _groups(stage2) == {
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


# --------------------------------------------------------------------------------------------------------------
# Auxiliary heads and context adjustment
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Augmentation and mixing, as FoldTrainer wires them
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stereo_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--stereo-correct-aug", "--aug-prob", "1", "--stereo-swap-prob", "0.3")


@pytest.fixture(scope="module")
def mix_run(tiny_data, tmp_path_factory) -> Run:
    return train(tmp_path_factory, tiny_data, "--mixup-prob", "0.5", "--mixup-alpha", "0.3", "--cutmix-prob",
                 "0.25", "--cutmix-alpha", "0.7")


def test_augmentation_options_reach_the_training_dataset(default_run, stereo_run):
    assert stereo_run.rc == 0
    aug = stereo_run.trainers[0].train_loader.dataset.augment
    assert (aug.aug_prob, aug.stereo_correct, aug.swap_prob) == (1.0, True, 0.3)
    aug = default_run.trainers[0].train_loader.dataset.augment
    assert (aug.aug_prob, aug.stereo_correct, aug.swap_prob) == (0.5, False, 0.0)
    for run in (default_run, stereo_run):  # validation is never augmented or mixed
        val = run.trainers[0].val_loader.dataset
        assert val.augment is None and val.mixer is None
    assert default_run.trainers[0].train_loader.dataset.mixer is None  # mixing off by default


def _marked_view(size: int = 32, background: int = 90) -> np.ndarray:
    """A textured uint8 view with a bright square near the top-left corner (to see flips and rotations)."""
    rng = np.random.default_rng(0)
    view = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    view[3:11, 4:12] = 250
    return view


def _centroid(tiles: torch.Tensor) -> np.ndarray:
    """Centre of the brightest pixels of a one-tile view tensor (1, 3, S, S), normalised or not."""
    img = tiles[0].mean(0).numpy()
    ys, xs = np.nonzero(img > img.min() + 0.6 * (img.max() - img.min()))
    return np.array([ys.mean(), xs.mean()])


@contextmanager
def photos(run: Run, left: np.ndarray, right: np.ndarray):
    """The run's training dataset, with every photo replaced by the given views (restored afterwards)."""
    ds = run.trainers[0].train_loader.dataset
    saved = ds.image_cache
    ds.image_cache = {p: (left, right) for p in ds.paths}
    try:
        yield ds
    finally:
        ds.image_cache = saved


def test_stereo_correct_aug_shares_geometry_but_not_photometry(stereo_run):
    view = _marked_view()
    with photos(stereo_run, view, view.copy()) as ds:
        items = [ds[i % len(ds)] for i in range(40)]
    centroids = []
    for item in items:
        left, right = item["left"], item["right"]
        assert not torch.equal(left, right)  # brightness, colour, noise drawn per view
        cl, cr = _centroid(left), _centroid(right)
        assert np.abs(cl - cr).max() < 2.0  # the same flip / rotation / affine on both views
        centroids.append(cl)
    quadrants = {(c[0] > 16, c[1] > 16) for c in centroids}
    assert len(quadrants) >= 3  # the geometry really changes between draws
    brightness = [abs(float(i["left"].mean() - i["right"].mean())) for i in items]
    assert np.mean(brightness) > 0.02


def test_without_stereo_correct_aug_both_views_get_identical_augmentation(default_run):
    view = _marked_view()
    with photos(default_run, view, view.copy()) as ds:
        items = [ds[i % len(ds)] for i in range(40)]
        untouched = BiomassDataset(pd.DataFrame({"abs_path": ds.paths}), ds.tiles,
                                   image_cache=ds.image_cache)[0]["left"]
    changed = 0
    for item in items:
        assert torch.equal(item["left"], item["right"])
        changed += not torch.equal(item["left"], untouched)
    assert changed >= len(items) // 4  # aug-prob 0.5 does change the views


def _swaps(run: Run, n: int) -> int:
    """How many of n training items come out with the bright right view on the left."""
    with photos(run, _marked_view(background=40), _marked_view(background=200)) as ds:
        items = [ds[i % len(ds)] for i in range(n)]
    return sum(float(item["left"].mean()) > float(item["right"].mean()) for item in items)


def test_stereo_swap_prob_swaps_left_and_right(default_run, stereo_run):
    assert _swaps(default_run, n=60) == 0
    swaps = _swaps(stereo_run, n=120)
    assert 15 <= swaps <= 60  # about 0.3 of 120 draws


def test_mixing_options_reach_the_mixer(mix_run):
    assert mix_run.rc == 0
    mixer = mix_run.trainers[0].train_loader.dataset.mixer
    assert (mixer.mixup_prob, mixer.mixup_alpha, mixer.cutmix_prob, mixer.cutmix_alpha) == (0.5, 0.3, 0.25, 0.7)


def test_mixing_partners_share_species_month_and_state(mix_run):
    trainer = mix_run.trainers[0]
    ds, df = trainer.train_loader.dataset, trainer.train_df
    partners = ds.mixer.partners
    keys = list(zip(df["Species"], df["month"], df["State"], strict=True))
    for i, js in enumerate(partners):  # exactly the other training images of the same context
        assert sorted(js) == [j for j in range(len(df)) if j != i and keys[j] == keys[i]]
    assert sum(len(js) > 0 for js in partners) >= 4
    loaded: list[int] = []
    load = ds.load
    ds.load = lambda j: (loaded.append(j), load(j))[1]
    try:
        mixed = _check_mixed_items(ds, keys, loaded)
    finally:
        del ds.load
    assert mixed > 0


def _check_mixed_items(ds: BiomassDataset, keys: list[tuple], loaded: list[int]) -> int:
    """Draw every item four times; each mix must use a partner of the same context and mix the targets linearly.
    Returns the number of mixed items."""
    mixed = 0
    for _ in range(4):
        for i in range(len(ds)):
            loaded.clear()
            target = ds[i]["target"].numpy().astype(np.float64)
            own = ds.targets[i].astype(np.float64)
            if len(loaded) == 1:  # not mixed: the image's own targets
                assert loaded == [i] and np.allclose(target, own)
                continue
            assert loaded[0] == i and len(loaded) == 2
            j = loaded[1]
            assert keys[j] == keys[i] and j != i
            other = ds.targets[j].astype(np.float64)
            lam = np.dot(target - other, own - other) / max(np.dot(own - other, own - other), 1e-12)
            assert -1e-6 <= lam <= 1 + 1e-6 and np.allclose(target, lam * own + (1 - lam) * other, atol=1e-3)
            mixed += 1
    return mixed


# --------------------------------------------------------------------------------------------------------------
# Seeds, folds, output folder, device
# --------------------------------------------------------------------------------------------------------------
def _comparable(run: Run) -> pd.DataFrame:
    return run.log_df().drop(columns=list(LOG_TIMING))


def test_seed_makes_a_run_repeatable(tiny_data, tmp_path_factory):
    fold_csv = str(tiny_data / "trainfold.csv")
    args = ("--fold-csv", fold_csv, "--batch-size", "8", "--epochs", "2")
    a = train(tmp_path_factory, tiny_data, *args, "--seed", "5")
    b = train(tmp_path_factory, tiny_data, *args, "--seed", "5")
    c = train(tmp_path_factory, tiny_data, *args, "--seed", "6")
    pd.testing.assert_frame_equal(_comparable(a), _comparable(b))
    ka, kb, kc = a.ckpt()["model"], b.ckpt()["model"], c.ckpt()["model"]
    assert all(torch.equal(ka[k], kb[k]) for k in ka)
    assert not all(torch.equal(ka[k], kc[k]) for k in ka)
    assert not _comparable(a)["train_total"].equals(_comparable(c)["train_total"])


def _folds_csv(run: Run) -> pd.DataFrame:
    return pd.read_csv(run.out / "folds.csv")


# group_date_state_bin stratifies by State x Total quartile: on 30 images no stratum has 5 members, so 4 folds.
@pytest.mark.parametrize("strategy, group, k", [
    ("group_month", "month", 5), ("group_date", "Sampling_Date", 5), ("group_date_state", "month", 5),
    ("group_date_state_bin", "month", 4), ("stratified", None, 5), ("random", None, 5)])
def test_cv_strategy_writes_its_folds(tiny_data, tmp_path_factory, strategy, group, k):
    run = train(tmp_path_factory, tiny_data, "--cv-strategy", strategy, "--num-folds", str(k), "--batch-size", "32")
    assert run.rc == 0
    folds = _folds_csv(run)
    df = load_train(tiny_data)
    assert list(folds.columns) == ["sample_id_prefix", "fold"]
    assert folds["sample_id_prefix"].tolist() == df["sample_id_prefix"].tolist()
    np.testing.assert_array_equal(folds["fold"].to_numpy(), make_folds(df, strategy, k, 18))
    assert sorted(folds["fold"].unique()) == list(range(k))
    if group is not None:  # no group is split between folds
        assert (df.assign(fold=folds["fold"]).groupby(group)["fold"].nunique() == 1).all()
    assert run.config["data"]["cv_strategy"] == strategy
    trainer = run.trainers[0]
    assert len(trainer.val_df) == int((folds["fold"] == 0).sum())


def test_fold_csv_overrides_the_cv_strategy(tiny_data, tmp_path_factory):
    given = pd.read_csv(tiny_data / "trainfold.csv")
    run = train(tmp_path_factory, tiny_data, "--fold-csv", str(tiny_data / "trainfold.csv"), "--cv-strategy",
                "random", "--batch-size", "32")
    folds = _folds_csv(run)
    assert dict(zip(folds["sample_id_prefix"], folds["fold"], strict=True)) == dict(
        zip(given["sample_id_prefix"], given["fold"], strict=True))
    assert set(run.trainers[0].val_df["sample_id_prefix"]) == set(given.loc[given["fold"] == 0, "sample_id_prefix"])


def test_num_folds_and_train_folds(tiny_data, tmp_path_factory):
    run = train(tmp_path_factory, tiny_data, "--num-folds", "3", "--train-folds", "0", "2", "--batch-size", "32")
    assert run.rc == 0
    folds = _folds_csv(run)
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    assert sorted(p.name for p in run.out.glob("5head_best_fold*.pth")) == ["5head_best_fold0.pth",
                                                                           "5head_best_fold2.pth"]
    assert sorted(p.name for p in run.out.glob("log_fold*.csv")) == ["log_fold0.csv", "log_fold2.csv"]
    assert sorted(run.summary["folds"]) == ["0", "2"] and run.summary["train_folds"] == [0, 2]
    for trainer, k in zip(run.trainers, (0, 2), strict=True):
        assert trainer.fold == k and run.ckpt(k)["fold"] == k
        assert set(trainer.val_df["sample_id_prefix"]) == set(folds.loc[folds["fold"] == k, "sample_id_prefix"])
        assert not set(trainer.train_df["sample_id_prefix"]) & set(trainer.val_df["sample_id_prefix"])


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
