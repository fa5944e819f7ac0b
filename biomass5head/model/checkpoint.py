"""Checkpoints: where a fold's best weights are written, how a run folder's checkpoints are found, and reading them
back. Tensors and plain Python types only, written atomically, loaded with weights_only=True."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from biomass5head.fileio import atomic_path

FORMAT_VERSION = 1  # raise when the payload changes shape; load_checkpoint refuses other versions
CHECKPOINT_RE = re.compile(r"^5head_best_fold(\d+)\.pth$")


def checkpoint_name(fold: int) -> str:
    """File name of a fold's best checkpoint inside a run folder."""
    return f"5head_best_fold{fold}.pth"


def find_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """{fold: path} of the `5head_best_fold{k}.pth` files in a run folder, by fold."""
    found = {int(m.group(1)): p for p in Path(run_dir).iterdir() if (m := CHECKPOINT_RE.match(p.name))}
    return dict(sorted(found.items()))


def save_checkpoint(path: str | os.PathLike, *, model_state: dict, config: dict, fold: int, epoch: int,
                    best_score: float, target_transform: dict, context_ratios: dict | None, metrics: dict,
                    interval_bins: dict | None = None) -> None:
    """Write everything needed to use the weights later: configuration as plain data, fold, epoch, score,
    target normalisation, context ratios and (--interval-heads) the fold's interval bins."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "config": config,
        "fold": int(fold),
        "epoch": int(epoch),
        "best_score": float(best_score),
        "target_transform": target_transform,
        "context_ratios": context_ratios,
        "metrics": metrics,
        "interval_bins": interval_bins,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (no pickled code); a missing, corrupt, foreign or other-version file is a clear
    error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a 5-head checkpoint")
    missing = [k for k in ("model", "config", "fold", "target_transform") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}: not a 5-head checkpoint")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {version}, this biomass5head reads version "
                         f"{FORMAT_VERSION}: use the biomass5head release that wrote it")
    return ckpt
