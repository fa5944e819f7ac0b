"""Spied runs for the frozen-feature cache tests (tests/data, tests/train, tests/infer): backbone passes, photo
decodes (pixel datasets vs cache builds), batches, epochs and the package's log lines, recorded without changing
what runs. Models use timm's `test_vit` (random initialisation, patch 16, D = 64) on 32 px tiles.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import biomass5head.data.datasets
import biomass5head.data.feature_cache
import biomass5head.model.five_head
import biomass5head.model.predict
import biomass5head.train.engine
import biomass5head.train.trainer
from biomass5head.cli import eval as eval_5head_oof
from biomass5head.cli import train as train_5head
from biomass5head.constants import TARGETS
from biomass5head.data.images import load_views
from biomass5head.device import Precision, Runtime
from biomass5head.model.backbone import create_backbone

BACKBONE = "test_vit"
IMG = 32
GRID = (2, 2)  # several tiles per view, so that a flip must also mirror the tile order
CPU = torch.device("cpu")
PRED_COLS = [f"pred_{t}" for t in TARGETS]
RUN_ARGS = ["--backbone", BACKBONE, "--img-size", str(IMG), "--grid", "1", "2", "--batch-size", "4",
            "--num-workers", "0", "--device-type", "cpu", "--amp-dtype", "float32", "--epochs", "1",
            "--train-folds", "0"]


F32 = Runtime(CPU, Precision("float32", None, "tests"), 0)


def bf16() -> Runtime:
    """A CPU runtime that computes in bfloat16 autocast (the tensors here are small enough for any CPU)."""
    return Runtime(CPU, Precision("bfloat16", torch.bfloat16, "tests"), 0)


# --------------------------------------------------------------------------------------------------------------
# Spies
# --------------------------------------------------------------------------------------------------------------
class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@dataclass
class Record:
    """What happened inside a `spies()` block."""
    log: list[str] = field(default_factory=list)
    events: list[tuple] = field(default_factory=list)  # ("epoch", n), ("pixels", path), ("cache", path) in order
    batches: list[dict] = field(default_factory=list)  # per forward_batch: training, on features, epoch
    datasets: list = field(default_factory=list)  # per training epoch: the train loader's dataset
    encodes: int = 0  # FiveHeadModel.encode calls (backbone passes)
    epoch: int = -1

    @property
    def text(self) -> str:
        return "\n".join(self.log)

    def decodes(self, kind: str) -> list[str]:
        return [e[1] for e in self.events if e[0] == kind]

    def train_batches(self, epoch: int | None = None) -> list[dict]:
        return [b for b in self.batches if b["training"] and epoch in (None, b["epoch"])]


@contextlib.contextmanager
def spies():
    """Record backbone passes, photo decodes (pixel datasets vs cache builds), batches, epochs and `src` logs."""
    rec = Record()
    handler = _ListHandler()
    src_logger = logging.getLogger("biomass5head")
    old_level = src_logger.level
    src_logger.setLevel(logging.INFO)
    src_logger.addHandler(handler)
    encode = biomass5head.model.five_head.FiveHeadModel.encode
    forward_batch = biomass5head.model.predict.forward_batch
    train_one_epoch = biomass5head.train.trainer.train_one_epoch

    def spy_encode(self, x):
        rec.encodes += 1
        return encode(self, x)

    def spy_forward_batch(model, batch, *a, **kw):
        rec.batches.append({"training": model.training, "feats": "left_feats" in batch, "pixels": "left" in batch,
                            "epoch": rec.epoch})
        return forward_batch(model, batch, *a, **kw)

    def spy_train_one_epoch(model, loader, *a, **kw):
        rec.epoch = kw.get("epoch", rec.epoch + 1)
        rec.events.append(("epoch", rec.epoch))
        rec.datasets.append(loader.dataset)
        return train_one_epoch(model, loader, *a, **kw)

    def decoder(kind, original):
        def spy(path, grid, img_size):
            rec.events.append((kind, str(path)))
            return original(path, grid, img_size)
        return spy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(biomass5head.model.five_head.FiveHeadModel, "encode", spy_encode)
        mp.setattr(biomass5head.train.engine, "forward_batch", spy_forward_batch)
        mp.setattr(biomass5head.model.predict, "forward_batch", spy_forward_batch)
        mp.setattr(biomass5head.train.trainer, "train_one_epoch", spy_train_one_epoch)
        mp.setattr(biomass5head.data.datasets, "load_views", decoder("pixels", load_views))
        mp.setattr(biomass5head.data.feature_cache, "load_views", decoder("cache", load_views))
        try:
            yield rec
        finally:
            src_logger.removeHandler(handler)
            src_logger.setLevel(old_level)
            rec.log = handler.messages



def train(data: Path, out: Path, cache_dir: Path, *args: str) -> Record:
    argv = ["--base-path", str(data), *RUN_ARGS, "--output-dir", str(out), "--feature-cache", str(cache_dir), *args]
    if "--backbone-weights" not in args:
        argv.append("--no-pretrained")
    with spies() as rec:
        assert train_5head.main(argv) == 0
    return rec


def npy_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.npy")) if folder.exists() else []


def write_test_vit_weights(path: Path) -> Path:
    """test_vit weights that every fold and re-run loads (random initialisation differs per fold seed)."""
    torch.manual_seed(1234)
    state = {k: v.contiguous() for k, v in create_backbone(BACKBONE, IMG, pretrained=False).state_dict().items()}
    save_file(state, path)
    return path


@dataclass
class HeadOnly:
    first: Record
    rerun: Record
    out: Path
    cache: Path


def head_only_runs(data: Path, base: Path) -> HeadOnly:
    """A head-only run of folds 0 and 1 with --aug-prob 0, then a re-run into a new folder with the same cache."""
    weights = write_test_vit_weights(base / "test_vit.safetensors")
    args = ("--freeze-backbone", "--aug-prob", "0", "--train-folds", "0", "1", "--backbone-weights", str(weights))
    first = train(data, base / "run", base / "cache", *args)
    rerun = train(data, base / "rerun", base / "cache", *args)
    return HeadOnly(first, rerun, base / "run", base / "cache")


def evaluate(run_dir: Path, *args: str) -> tuple[pd.DataFrame, Record]:
    with spies() as rec:
        assert eval_5head_oof.main(["--model-dir", str(run_dir), *args]) == 0
    return pd.read_csv(run_dir / "oof_predictions.csv"), rec
