"""Target transform between grams and the model's output space (identity, log1p or sqrt, then a per-target scale).

The model predicts ``t = f(y) / scale`` per target, with ``f = log1p`` under ``--use-log-target``, ``f = sqrt``
under ``--target-transform sqrt`` and the identity otherwise. ``scale`` is the training fold's mean of ``f(y)`` per
target. Scaling (rather than standardising) keeps ``y = 0`` at ``t = 0``, so the model's non-negative (softplus)
outputs can represent every valid target, while bringing the five targets to a comparable magnitude (about 1) for
the loss.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from biomass5head.constants import TARGETS, TOTAL

# Floor of the per-target scale: a fold where a target is always 0 must not divide by zero.
SCALE_EPS = 1e-3
# Floor (grams) of the gram scale the constraint loss divides residuals by.
GRAM_SCALE_FLOOR = 1.0
# Largest log1p(grams) decode accepts: expm1 overflows float32 above ~88 (and bfloat16 alike), which would turn
# a wild early prediction into inf and the constraint loss into NaN. 1e6 g is far beyond any 70x30 cm quadrat.
MAX_LOG1P_GRAMS = math.log1p(1e6)

ArrayOrTensor = np.ndarray | torch.Tensor


KINDS = ("identity", "log1p", "sqrt")


class TargetTransform:
    """Maps (N, 5) targets in grams to model space and back; works on numpy arrays and torch tensors."""

    def __init__(self, scale, log_target: bool = False, gram_scale: float = GRAM_SCALE_FLOOR, kind: str | None = None):
        """``scale``: (5,) positive values in f-space; ``gram_scale``: grams used to normalise constraint
        residuals (``fit`` sets it to the training fold's mean Total); ``kind``: one of KINDS (default: log1p when
        ``log_target``, else identity)."""
        kind = kind or ("log1p" if log_target else "identity")
        if kind not in KINDS:
            raise ValueError(f"target transform must be one of {', '.join(KINDS)}, got {kind!r}")
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        if scale.shape != (len(TARGETS),):
            raise ValueError(f"scale must have {len(TARGETS)} values, got shape {scale.shape}")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"scale must be finite and positive, got {scale.tolist()}")
        if not math.isfinite(gram_scale) or gram_scale <= 0:
            raise ValueError(f"gram_scale must be finite and positive, got {gram_scale}")
        self.scale = scale
        self.kind = kind
        self.log_target = kind == "log1p"
        self.gram_scale = float(gram_scale)

    @classmethod
    def fit(cls, y_grams, log_target: bool = False, kind: str | None = None) -> TargetTransform:
        """Fit on the training fold's targets (N, 5) in grams (TARGETS order); returns a new transform."""
        y = np.asarray(y_grams, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != len(TARGETS) or y.shape[0] == 0:
            raise ValueError(f"y_grams must be (N>0, {len(TARGETS)}), got shape {y.shape}")
        if not np.all(np.isfinite(y)):
            raise ValueError("y_grams contains non-finite values")
        if np.any(y < 0):
            raise ValueError(f"y_grams contains negative grams (min {y.min():.4g})")
        kind = kind or ("log1p" if log_target else "identity")
        f = {"log1p": np.log1p, "sqrt": np.sqrt}.get(kind, lambda v: v)(y)
        scale = np.maximum(f.mean(axis=0), SCALE_EPS)
        gram_scale = max(float(y[:, TOTAL].mean()), GRAM_SCALE_FLOOR)
        return cls(scale, gram_scale=gram_scale, kind=kind)

    def _scale_like(self, x: ArrayOrTensor) -> ArrayOrTensor:
        if isinstance(x, torch.Tensor):
            return torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        return self.scale

    def encode(self, y: ArrayOrTensor) -> ArrayOrTensor:
        """Grams (..., 5) -> model space; returns the same kind (numpy float64 or a floating tensor)."""
        if isinstance(y, torch.Tensor):
            y = y if y.is_floating_point() else y.float()
            f = {"log1p": torch.log1p, "sqrt": torch.sqrt}.get(self.kind, lambda v: v)(y)
        else:
            y = np.asarray(y, dtype=np.float64)
            f = {"log1p": np.log1p, "sqrt": np.sqrt}.get(self.kind, lambda v: v)(y)
        return f / self._scale_like(y)

    def decode(self, t: ArrayOrTensor) -> ArrayOrTensor:
        """Model space (..., 5) -> grams, clamped to >= 0; differentiable for tensors (NaN stays NaN)."""
        if isinstance(t, torch.Tensor):
            t = t if t.is_floating_point() else t.float()
            f = t * self._scale_like(t)
            if self.kind == "log1p":
                return torch.expm1(f.clamp(max=MAX_LOG1P_GRAMS)).clamp(min=0.0)
            return f.clamp(min=0.0).square() if self.kind == "sqrt" else f.clamp(min=0.0)
        t = np.asarray(t, dtype=np.float64)
        f = t * self.scale
        if self.kind == "log1p":
            return np.maximum(np.expm1(np.minimum(f, MAX_LOG1P_GRAMS)), 0.0)
        return np.square(np.maximum(f, 0.0)) if self.kind == "sqrt" else np.maximum(f, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form for checkpoints (loadable with ``torch.load(weights_only=True)``)."""
        return {"log_target": self.log_target, "kind": self.kind, "scale": [float(s) for s in self.scale],
                "gram_scale": self.gram_scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetTransform:
        """Inverse of ``to_dict``."""
        return cls(d["scale"], bool(d["log_target"]), float(d.get("gram_scale", GRAM_SCALE_FLOOR)), d.get("kind"))

    def __repr__(self) -> str:
        scale = ", ".join(f"{s:.4g}" for s in self.scale)
        return f"TargetTransform(kind={self.kind}, scale=[{scale}], gram_scale={self.gram_scale:.4g})"
