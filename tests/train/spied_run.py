"""Spied training runs for the option tests: `train()` runs `biomass5head train` (`cli.train.main`) with spies that
record what the run did (trainers, optimiser groups, backbone digests per epoch, validation predictions, model
inputs and autocast state, gradient clipping, photo decoding) without changing it.

The runs use timm's `test_vit` (a real ViT: 0.3 M parameters, patch 16, D = 64, random initialisation) on 32 px
tiles so that each one takes about a second on a CPU; `tests/cli/test_spec_commands.py` runs the reference's
commands with ViT-S/14.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch

import biomass5head.cli.train
import biomass5head.data.datasets
import biomass5head.device
import biomass5head.model.five_head
import biomass5head.train.kfold
import biomass5head.train.refit
import biomass5head.train.trainer
from biomass5head.data.folds import make_folds
from biomass5head.data.tables import load_train
from biomass5head.device import CpuInfo

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
    if "--feature-cache" not in args and "--no-feature-cache" not in args:  # a cache of the run's own: no test
        argv += ["--feature-cache", str(out.parent / "feature_cache")]  # depends on what ran before it
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

    class RecordingRefit(biomass5head.train.refit.RefitTrainer):
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

    mp.setattr(biomass5head.train.kfold, "FoldTrainer", RecordingTrainer)
    mp.setattr(biomass5head.train.kfold, "RefitTrainer", RecordingRefit)
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


def lr_groups(opt: dict) -> dict[tuple[str, float], float]:
    """{(group name, weight decay): lr} of an optimiser recorded at creation."""
    return {(g["name"], g["weight_decay"]): g["lr"] for g in opt["groups"]}


def param_ids(opt: dict, name: str) -> set[int]:
    return {id(p) for g in opt["groups"] if g["name"] == name for p in g["params"]}


def comparable_log(run: Run) -> pd.DataFrame:
    """The fold-0 log without its timing columns: equal for repeated runs of one seed."""
    return run.log_df().drop(columns=list(LOG_TIMING))
