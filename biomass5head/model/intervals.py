"""Interval bins of the auxiliary interval-classification heads (--interval-heads K): up to K quantile bins per target,
fitted on the training fold's values in grams, so each head classifies its target into a range.

Zero-inflated targets (Clover is exactly 0 in about 40% of the real photos, Dead in about 10%) get a bin of their
own for 0 when at least ``zero_share_min(K)`` of the fold's values are 0; their other K - 1 bins are quantiles of the
positive values. Quantile edges that coincide (tied values) are merged, so a target may end with fewer than K bins.
Labels follow ``np.searchsorted(edges, value, side="right")``: a value equal to an edge belongs to the bin above it.
Edges are values of the fold (quantiles by the inverted CDF), so no bin is empty on the training values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from biomass5head.constants import TARGET_SHORT, TARGETS

MAX_BINS = 50


def zero_share_min(k: int) -> float:
    """Share of exact zeros from which 0 gets a bin of its own: half of what one of K equal bins would hold, so
    the zero class is never a handful of photos."""
    return 0.5 / k


@dataclass(frozen=True)
class TargetBins:
    """One target's bins: an optional bin for exactly 0 (class 0), then the intervals the interior `edges` cut."""
    zero_bin: bool
    edges: tuple[float, ...]

    @property
    def n_bins(self) -> int:
        return int(self.zero_bin) + len(self.edges) + 1


@dataclass(frozen=True)
class IntervalBins:
    """The bins of all five targets (TARGETS order) and the K they were fitted with."""
    k: int
    targets: tuple[TargetBins, ...]

    @classmethod
    def fit(cls, y_grams, k: int) -> IntervalBins:
        """Quantile bins from the training fold's (N, 5) targets in grams."""
        if not 2 <= k <= MAX_BINS:
            raise ValueError(f"--interval-heads must be between 2 and {MAX_BINS} bins, got {k}")
        # float32 values (what batches carry), so an edge that is a data value compares equal to it in `labels`.
        y = np.asarray(y_grams, dtype=np.float32).astype(np.float64)
        if y.ndim != 2 or y.shape[1] != len(TARGETS) or len(y) == 0 or not np.all(np.isfinite(y)):
            raise ValueError(f"interval bins need finite (N>0, {len(TARGETS)}) targets, got shape {y.shape}")
        bins = []
        for values in y.T:
            zero_bin = float(np.mean(values <= 0)) >= zero_share_min(k)
            rest = values[values > 0] if zero_bin else values
            n = k - 1 if zero_bin else k
            # inverted_cdf: every edge is one of the fold's values, so each bin holds at least the value at its lower
            # edge (no empty bin, however few values per bin).
            edges = (np.unique(np.quantile(rest, np.arange(1, n) / n, method="inverted_cdf"))
                     if len(rest) and n > 1 else np.zeros(0))
            if len(rest):  # an edge at the smallest value would leave the bin below it empty (ties at the minimum)
                edges = edges[edges > rest.min()]
            bins.append(TargetBins(zero_bin, tuple(float(e) for e in edges)))
        return cls(int(k), tuple(bins))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of bins of each target (the width of its head)."""
        return tuple(t.n_bins for t in self.targets)

    def labels(self, y_grams: torch.Tensor) -> torch.Tensor:
        """(B, 5) grams -> (B, 5) long class indices (0 = the zero bin where a target has one)."""
        columns = []
        for j, t in enumerate(self.targets):
            v = y_grams[:, j].float().contiguous()
            edges = torch.tensor(t.edges, dtype=v.dtype, device=v.device)
            label = torch.bucketize(v, edges, right=True)
            if t.zero_bin:
                label = torch.where(v <= 0, torch.zeros_like(label), label + 1)
            columns.append(label)
        return torch.stack(columns, dim=1)

    def to_dict(self) -> dict:
        """Plain data for the checkpoint: {"k": K, "targets": {name: {"zero_bin": bool, "edges": [...]}}}."""
        return {"k": self.k, "targets": {name: {"zero_bin": t.zero_bin, "edges": list(t.edges)}
                                         for name, t in zip(TARGETS, self.targets, strict=True)}}

    @classmethod
    def from_dict(cls, d: dict) -> IntervalBins:
        try:
            targets = tuple(TargetBins(bool(d["targets"][name]["zero_bin"]),
                                       tuple(float(e) for e in d["targets"][name]["edges"])) for name in TARGETS)
            return cls(int(d["k"]), targets)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed interval bins {d!r}: {exc}") from exc

    def describe(self) -> str:
        """One log line: each target's bin count and whether one of them is the zero bin."""
        pairs = zip(TARGETS, self.targets, strict=True)
        return ", ".join(f"{name} {t.n_bins}{' (zero bin)' if t.zero_bin else ''}" for name, t in pairs)


def split_log_probs(log_probs: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """The model's concatenated interval output (B, sum(sizes)) -> one (B, n_k) block per target."""
    return list(torch.split(log_probs, list(sizes), dim=1))


def interval_accuracy(bins: IntervalBins, probs, true_grams) -> dict[str, float]:
    """Share of images whose interval head picks the bin of the true value: `acc_interval_{target}` per target and
    their mean `acc_interval`. `probs` (N, sum of bins) as `model.predict` returns them, `true_grams` (N, 5)."""
    labels = bins.labels(torch.as_tensor(np.asarray(true_grams)))
    blocks = split_log_probs(torch.as_tensor(np.asarray(probs)), bins.sizes)
    per = {f"acc_interval_{short}": float((block.argmax(1) == labels[:, j]).float().mean())
           for j, (short, block) in enumerate(zip(TARGET_SHORT, blocks, strict=True))}
    return {"acc_interval": float(np.mean(list(per.values()))), **per}
