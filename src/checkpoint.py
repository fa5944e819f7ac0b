"""Checkpoints: tensors and plain Python types only, written atomically, loaded with weights_only=True."""
from __future__ import annotations

import os

import torch

from .fileio import atomic_path

FORMAT_VERSION = 1


def checkpoint_name(fold: int) -> str:
    return f"5head_best_fold{fold}.pth"


def save_checkpoint(path: str | os.PathLike, *, model_state: dict, config: dict, fold: int, epoch: int,
                    best_score: float, target_transform: dict, context_ratios: dict | None, metrics: dict,
                    extra: dict | None = None) -> None:
    """Write everything needed to use the weights later: configuration as plain data, fold, epoch, score,
    target normalisation and context ratios."""
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
    }
    if extra:
        payload.update(extra)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (no pickled code); a missing or corrupt file is a clear error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    missing = [k for k in ("model", "config", "fold", "target_transform") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}: not a 5-head checkpoint")
    return ckpt
