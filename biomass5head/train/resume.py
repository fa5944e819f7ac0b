"""What a fold needs to continue exactly where it stopped: `5head_last_fold{k}.pth` beside the best checkpoint.

A snapshot is taken in memory at the end of every epoch (model, optimizer, scheduler, GradScaler, the random states of
Python, NumPy, torch and every DataLoader, early-stopping counters, best score, log rows); it is written atomically
when `--save-every` seconds have passed since the last write and whenever the fold stops before its end (an error,
SIGINT, SIGTERM). `python -m src.train_5head --resume RUN` restores it, so the resumed fold repeats what the
uninterrupted one would have done. The file is removed when the fold ends, unless `--keep-last`.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from biomass5head.fileio import atomic_path

RESUME_FORMAT = 1


def last_state_name(fold: int) -> str:
    return f"5head_last_fold{fold}.pth"


@dataclass
class Progress:
    """Where a fold is: the stage being trained, the next epoch (counted over all stages), epochs done in the stage,
    and early stopping's view (best score and epoch, epochs without improvement in this stage)."""
    stage_index: int = 0
    epoch: int = 0
    epoch_in_stage: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    stale: int = 0


def _cpu(value):
    """A copy of a (nested) state dict with every tensor on the CPU, detached from what keeps training."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def rng_states(loaders: dict[str, torch.utils.data.DataLoader]) -> dict:
    """The random states that decide what comes next: Python, NumPy, torch (CPU and CUDA) and each loader's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"python": [version, list(internal), py_gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "loaders": {name: loader.generator.get_state() for name, loader in loaders.items()}}


def set_rng_states(states: dict, loaders: dict[str, torch.utils.data.DataLoader]) -> None:
    version, internal, py_gauss = states["python"]
    random.setstate((version, tuple(internal), py_gauss))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    for name, loader in loaders.items():
        loader.generator.set_state(states["loaders"][name])


def snapshot(progress: Progress, model, optimizer, scheduler, scaler, loaders: dict, rows: list[dict],
             ema=None) -> dict:
    """The in-memory state of a fold at the end of an epoch (with the weight average under --ema-decay)."""
    return {"format": RESUME_FORMAT, "progress": asdict(progress), "model": _cpu(model.state_dict()),
            "ema": _cpu(ema.state_dict()) if ema is not None else None,
            "optimizer": _cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_states(loaders),
            "rows": json.dumps(rows, default=float)}


def save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict | None:
    """The saved state of a fold, None when there is none; a damaged file is an error naming it."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise ValueError(f"cannot read the resume state {path} ({exc}); delete it to restart that fold") from exc
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a resume state of this biomass5head; delete it to restart that fold")
    state["progress"] = Progress(**state["progress"])
    state["rows"] = json.loads(state["rows"])
    return state
