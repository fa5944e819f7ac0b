"""Constrained MixUp / CutMix of two training images of the same Species, month and State.

Mixing pastures of different species or places makes images no real quadrat looks like, so a partner must
share all three; an image without one is left alone. Both stereo views get the same mixing (same lambda, same
CutMix box), and the five targets (grams) mix linearly by the pixel share of each image, which keeps
GDM = Green + Clover and Total = Green + Dead + Clover.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from biomass5head.data.augment import worker_seed

Views = tuple[np.ndarray, np.ndarray]
PARTNER_KEYS: tuple[str, ...] = ("Species", "month", "State")


def build_partner_index(df: pd.DataFrame) -> list[np.ndarray]:
    """For each row (by position), the positions of the OTHER rows with the same Species, month and State.

    Rows with a missing key get no partners: an unknown State or month is not evidence of the same context.
    """
    missing = [key for key in PARTNER_KEYS if key not in df.columns]
    if missing:
        raise ValueError(f"partner index needs columns {list(PARTNER_KEYS)}; missing {missing}")
    keys = df[list(PARTNER_KEYS)].reset_index(drop=True)
    partners = [np.empty(0, dtype=np.int64) for _ in range(len(keys))]
    for positions in keys.groupby(list(PARTNER_KEYS), sort=False, dropna=True).indices.values():
        positions = np.asarray(positions, dtype=np.int64)
        for pos in positions:
            partners[pos] = positions[positions != pos]
    return partners


def sample_lambda(alpha: float, rng: np.random.Generator) -> float:
    """One draw from Beta(alpha, alpha)."""
    if alpha <= 0:
        raise ValueError(f"Beta alpha must be > 0, got {alpha}")
    return float(rng.beta(alpha, alpha))


def _check_pair(a: Views, b: Views) -> None:
    shapes = {view.shape for view in (*a, *b)}
    if len(shapes) != 1:
        raise ValueError(f"mixing needs four views of one shape, got {sorted(shapes)}")


def mixup_views(a: Views, b: Views, lam: float) -> Views:
    """Pixel blend lam * a + (1 - lam) * b of each view, rounded back to uint8."""
    _check_pair(a, b)

    def blend(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        mixed = lam * x.astype(np.float32) + (1.0 - lam) * y.astype(np.float32)
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)

    return blend(a[0], b[0]), blend(a[1], b[1])


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Box (y0, y1, x0, x1) covering about 1 - lam of the image, centred uniformly and clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(round(height * cut)), int(round(width * cut))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return y0, y1, x0, x1


def cutmix_views(a: Views, b: Views, lam: float, rng: np.random.Generator) -> tuple[Views, float]:
    """Paste one random box of b into a, the same box in both views.

    Returns ((left, right), lam_area) where lam_area is the fraction of pixels still from a; the box is
    clipped at the borders, so lam_area (not lam) is what the targets must be mixed by.
    """
    _check_pair(a, b)
    height, width = a[0].shape[:2]
    y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
    mixed = []
    for view_a, view_b in zip(a, b, strict=True):
        out = view_a.copy()
        out[y0:y1, x0:x1] = view_b[y0:y1, x0:x1]
        mixed.append(out)
    lam_area = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return (mixed[0], mixed[1]), lam_area


class PairMixer:
    """Chooses, for training image i, at most one of MixUp or CutMix with a random partner of the same context.

    Per call, from one draw: MixUp with probability `mixup_prob`, CutMix with probability `cutmix_prob`, no mix
    otherwise (a sum above 1 leaves CutMix 1 - mixup_prob; train_5head refuses such a sum). Only images with a
    partner in `partners` (see `build_partner_index`) are mixed; without partners (None or an empty list for i)
    nothing is mixed. Randomness comes from `seed` only (see `reseed`).
    """

    def __init__(self, mixup_prob: float = 0.0, mixup_alpha: float = 0.4, cutmix_prob: float = 0.0,
                 cutmix_alpha: float = 1.0, partners: Sequence[np.ndarray] | None = None, seed: int | None = None):
        for name, value in (("mixup_prob", mixup_prob), ("cutmix_prob", cutmix_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.mixup_prob, self.mixup_alpha = float(mixup_prob), float(mixup_alpha)
        self.cutmix_prob, self.cutmix_alpha = float(cutmix_prob), float(cutmix_alpha)
        self.partners = partners
        self.reseed(seed)

    @property
    def enabled(self) -> bool:
        """Whether any mixing can happen at all (a probability above zero)."""
        return self.mixup_prob > 0.0 or self.cutmix_prob > 0.0

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream from `seed` (None: fresh entropy), e.g. per DataLoader worker and epoch."""
        self._rng = np.random.default_rng(seed)
        self._pid = os.getpid()

    def _choose(self) -> str:
        # One draw: MixUp with probability mixup_prob, CutMix with probability cutmix_prob (each as documented;
        # the options together must not exceed 1), otherwise no mix.
        r = self._rng.random()
        if r < self.mixup_prob:
            return "mixup"
        if r < self.mixup_prob + self.cutmix_prob:
            return "cutmix"
        return "none"

    def __call__(self, i: int, views: Views, targets: np.ndarray,
                 load_fn: Callable[[int], tuple[Views, np.ndarray]]) -> tuple[Views, np.ndarray, dict]:
        """Mixed (views, targets in grams, info) for image i; info = {"mix", "partner", "lam"}.

        `load_fn(j)` returns the views and targets of partner j. Without a mix the inputs come back unchanged,
        with info {"mix": "none", "partner": -1, "lam": 1.0}.
        """
        unchanged = (views, targets, {"mix": "none", "partner": -1, "lam": 1.0})
        if not self.enabled or self.partners is None or len(self.partners[i]) == 0:
            return unchanged
        if self._pid != os.getpid():  # forked worker that nobody reseeded: do not copy the parent's stream
            self.reseed(worker_seed())
        mix = self._choose()
        if mix == "none":
            return unchanged
        j = int(self._rng.choice(self.partners[i]))
        views_j, targets_j = load_fn(j)
        if mix == "mixup":
            lam = sample_lambda(self.mixup_alpha, self._rng)
            views = mixup_views(views, views_j, lam)
        else:
            views, lam = cutmix_views(views, views_j, sample_lambda(self.cutmix_alpha, self._rng), self._rng)
        targets = np.asarray(targets)
        dtype = targets.dtype if np.issubdtype(targets.dtype, np.floating) else np.float64
        mixed = lam * targets.astype(np.float64) + (1.0 - lam) * np.asarray(targets_j, dtype=np.float64)
        return views, mixed.astype(dtype), {"mix": mix, "partner": j, "lam": float(lam)}

    def __repr__(self) -> str:
        return (f"PairMixer(mixup_prob={self.mixup_prob}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_prob={self.cutmix_prob}, cutmix_alpha={self.cutmix_alpha})")
