"""A run folder several processes train together (fold-parallel): joining an existing run, per-fold locks, and the
summary.json they all add to.

Folds are independent, so K devices can train K folds at once: one process per fold, each with `--train-folds k`
and the same `--output-dir RUN`. The first creates RUN; a later one whose configuration is the same apart from
`--train-folds`, `--num-workers` and `--device-type` joins it: it reuses RUN's folds.csv and config.json and trains
only its folds. Each process holds an exclusive lock on each fold it trains (`RUN/.fold{k}.lock`, an flock that the
operating system releases when the process ends, however it ends), so two processes never train one fold; a fold
that summary.json already records is refused. summary.json is read, merged and rewritten under a lock of its own.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from biomass5head.config import ConfigError, RunConfig
from biomass5head.fileio import write_json

# What may differ between the processes that train one run (NOTES.md): which folds, and how each one executes.
# The run folder itself is the same by definition, however its path was spelled.
JOIN_FREE = (("data", "train_folds"), ("data", "num_workers"), ("device_type",), ("output_dir",))


class FoldBusy(ConfigError):
    """Another live process holds the fold's lock."""


def _comparable(record: dict) -> dict:
    out = json.loads(json.dumps({k: v for k, v in record.items() if k != "runtime"}))
    for path in JOIN_FREE:
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_differences(existing: dict, cfg: RunConfig) -> list[str]:
    """The settings in which `cfg` differs from a run's config.json record (ignoring JOIN_FREE), as "key: a -> b"."""
    # Through RunConfig, so a run written before an option existed compares with that option's default.
    old = _flatten(_comparable(RunConfig.from_dict(existing).to_dict()))
    new = _flatten(_comparable(cfg.to_dict()))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


@contextlib.contextmanager
def held_lock(path: Path, *, wait: bool):
    """An exclusive flock on `path` for the duration of the block (the file is removed on release). With `wait`
    False a lock held by another process raises FoldBusy naming the holder, as the file records it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FoldBusy(f"{path} is locked by {holder}") from None
        # The holder before us may have removed the file after we opened it: lock the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def fold_lock_path(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f".fold{fold}.lock"


def lock_folds(stack: contextlib.ExitStack, run_dir: Path, folds) -> None:
    """Take every fold's lock into `stack` at once, before anything trains; a busy fold is a clear error."""
    for fold in folds:
        try:
            stack.enter_context(held_lock(fold_lock_path(run_dir, fold), wait=False))
        except FoldBusy as exc:
            raise FoldBusy(f"fold {fold} of {run_dir} is being trained by another process ({exc}): give this one "
                           "other --train-folds") from None


def folds_in_training(run_dir: Path) -> list[int]:
    """Folds whose lock a live process holds now (a lock file left by a killed process is not held)."""
    held = []
    for path in Path(run_dir).glob(".fold*.lock"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(int(path.name[len(".fold"):-len(".lock")]))
        finally:
            os.close(fd)
    return sorted(held)


def run_lock(run_dir: Path):
    """The lock around creating or joining a run folder and around summary.json updates (waits its turn)."""
    return held_lock(Path(run_dir) / ".run.lock", wait=True)


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def finished_folds(run_dir: Path) -> dict[int, dict]:
    """The folds summary.json records as trained: {fold: its result}."""
    return {int(k): r for k, r in read_summary(run_dir).get("folds", {}).items()}


def record_fold(run_dir: Path, result: dict | None, asked, summarize) -> dict:
    """Add a finished fold's `result` (None: nothing new) to summary.json under the run lock, keeping what other
    processes recorded; `asked` are this process's --train-folds (summary.json keeps the union of all processes'),
    `summarize(results, asked_union)` builds the summary. Returns what was written."""
    with run_lock(run_dir):
        previous = read_summary(run_dir)
        results = {int(k): r for k, r in previous.get("folds", {}).items()}
        if result is not None:
            results[int(result["fold"])] = result
        union = sorted(set(previous.get("train_folds", [])) | set(asked))
        summary = summarize([results[k] for k in sorted(results)], union)
        write_json(Path(run_dir) / "summary.json", summary)
    return summary
