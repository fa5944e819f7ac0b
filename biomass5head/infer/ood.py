"""Is a photo like the training photos? A distance check on pooled backbone features, for the web page's warning.

A photo's pooled feature is the mean of its tile features over both views (the backbone's output, before any head).
Features are standardised with the training photos' mean and standard deviation; a photo's distance is the
Euclidean distance to its K-th nearest training photo. The threshold is the 99th percentile of the training photos'
own such distances (each left out of its own neighbours), so about 1 % of training photos would be flagged.

The reference (standardisation, training features, threshold) is stored in the run folder as `ood_reference.npz`
the first time it is needed: from the frozen-feature cache when training left the features there, else computed
from the training photos now. Where neither the file nor the training photos exist the check is off, and says why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biomass5head.fileio import atomic_path

logger = logging.getLogger(__name__)

REFERENCE_FILE = "ood_reference.npz"
NEIGHBOURS = 5
PERCENTILE = 99.0


def pooled(feats: np.ndarray) -> np.ndarray:
    """(..., 2, T, D) tile features -> (..., D): the mean over both views and all tiles."""
    return np.asarray(feats, np.float64).mean(axis=(-3, -2))


@dataclass
class OodReference:
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    train: np.ndarray  # (N, D) standardised pooled features of the training photos
    threshold: float
    source: str  # where the reference came from, for /api/model and the log
    key: str = ""  # what the features depend on (backbone weights, tiles, compute dtype): another key, another file

    @classmethod
    def build(cls, features: np.ndarray, source: str, k: int = NEIGHBOURS) -> OodReference:
        """From the training photos' pooled features (N, D), N > k."""
        x = np.asarray(features, np.float64)
        if len(x) <= k:
            raise ValueError(f"the out-of-distribution check needs more than {k} training photos, got {len(x)}")
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / std
        own = np.empty(len(z))
        sq = (z**2).sum(1)
        for start in range(0, len(z), 1024):  # N x 1024 distances at a time, whatever N and the feature size
            rows = slice(start, start + 1024)
            d = np.sqrt(np.maximum(sq[rows, None] + sq[None, :] - 2 * z[rows] @ z.T, 0.0))
            d[np.arange(d.shape[0]), np.arange(start, start + d.shape[0])] = np.inf  # each photo left out
            own[rows] = np.partition(d, k - 1, axis=1)[:, k - 1]
        return cls(mean, std, z, float(np.percentile(own, PERCENTILE)), source)

    def distance(self, feature: np.ndarray) -> float:
        """Distance of one pooled feature (D,) to its K-th nearest training photo, in standardised units."""
        z = (np.asarray(feature, np.float64) - self.mean) / self.std
        d = np.sqrt(((self.train - z) ** 2).sum(-1))
        return float(np.sort(d)[min(NEIGHBOURS, len(d)) - 1])

    def check(self, feature: np.ndarray) -> dict:
        dist = self.distance(feature)
        return {"flag": bool(dist > self.threshold), "distance": dist, "threshold": self.threshold,
                "ratio": dist / self.threshold if self.threshold > 0 else None}

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, std=self.std, train=self.train, threshold=self.threshold,
                         source=self.source, key=self.key)

    @classmethod
    def load(cls, path: Path) -> OodReference:
        with np.load(path) as z:
            return cls(z["mean"], z["std"], z["train"], float(z["threshold"]), f"{z['source']} ({path.name})",
                       str(z["key"]))


def reference_for_run(run_dir: Path, compute_features, key: str = "") -> tuple[OodReference | None, str]:
    """The run's reference: loaded from `ood_reference.npz` when it was made with the same `key`, else built with
    `compute_features()` -> ((N, 2, T, D) features, how they were obtained) and saved there. Returns (reference or
    None, what happened, for the log)."""
    path = Path(run_dir) / REFERENCE_FILE
    if path.is_file():
        try:
            ref = OodReference.load(path)
            if ref.key == key:
                return ref, f"loaded from {path}"
            logger.info("%s was made for other features (%s, not %s): computing it again", path, ref.key, key)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("unreadable %s (%s): computing it again", path, exc)
    try:
        feats, how = compute_features()
    except (OSError, ValueError) as exc:
        return None, f"off: no reference features ({exc})"
    try:
        ref = OodReference.build(pooled(feats), how)
    except ValueError as exc:  # too few training photos
        return None, f"off: {exc}"
    ref.key = key
    try:
        ref.save(path)
        where = f"saved to {path}"
    except OSError as exc:
        where = f"not saved ({exc})"
    return ref, f"{how}; {where}"
