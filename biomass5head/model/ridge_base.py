"""`--ridge-base`: a closed-form ridge regression inside the 5-head model, which the heads correct.

On a few hundred noisy photos a trained head of a million parameters loses to a linear model on the same frozen
features (docs/MODEL_QUALITY.md). With `--ridge-base` the model's output is

    reg = softplus(heads(x) + softplus^-1(ridge(x)))

where `ridge(x)` is a linear function of the mean tile feature of both views (standardised), fitted in the model's
target space (the `--target-transform`, divided by the per-target scale) on the fold's training images before the
first epoch. The heads' last layers start at zero, so training starts from the ridge's predictions and the heads
learn only what the ridge misses. The ridge's numbers are buffers of the model: they are saved in the checkpoint
and loaded with it, so eval and predict need nothing else.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ALPHAS = np.logspace(-1, 5, 13)
MIN_TARGET = 1e-3  # ridge outputs below this (model space) are raised to it before softplus^-1


def mean_tile_feature(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tile features of both views -> (B, D) mean over all 2T tiles."""
    return torch.cat([left, right], dim=1).mean(dim=1)


def ridge_solutions(x_fit: np.ndarray, t_fit: np.ndarray, alphas) -> tuple[np.ndarray, np.ndarray, list]:
    """Closed-form ridges of t_fit (N, K) on x_fit (N, D) for every alpha, from one SVD: (feature mean, feature std,
    [(weight (D, K), bias (K,)) per alpha]) with the features standardised as scikit-learn's StandardScaler does
    (a feature constant up to rounding is left unscaled) and an unpenalised intercept (as its Ridge). The same
    solver serves `--ridge-base` and the ridge probe (`infer/linear_probe.py`)."""
    mean, var = x_fit.mean(0), x_fit.var(0)
    n, eps = len(x_fit), np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    std = np.where(constant, 1.0, np.sqrt(var))
    t_mean = t_fit.mean(0)
    u, sv, vt = np.linalg.svd((x_fit - mean) / std, full_matrices=False)  # zero column means: centred
    ut_t = u.T @ (t_fit - t_mean)  # (k, K)
    weights = [vt.T @ ((sv / (sv**2 + a))[:, None] * ut_t) for a in alphas]
    return mean, std, [(w, t_mean) for w in weights]


class RidgeBase(nn.Module):
    """t = ((mean tile feature - mean) / std) @ weight + bias, in model space; all buffers (not trained)."""

    def __init__(self, dim: int, n_targets: int = 5):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.register_buffer("weight", torch.zeros(dim, n_targets))
        self.register_buffer("bias", torch.zeros(n_targets))

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """left, right (B, T, D) -> (B, 5) raw offset: softplus^-1 of the ridge's model-space prediction."""
        x = (mean_tile_feature(left, right).float() - self.feature_mean) / self.feature_std
        t = (x @ self.weight + self.bias).clamp(min=MIN_TARGET)
        return t + torch.log(-torch.expm1(-t))  # softplus^-1(t) = log(exp(t) - 1), stable for small and large t

    @torch.no_grad()
    def set(self, mean: np.ndarray, std: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> None:
        for name, value in (("feature_mean", mean), ("feature_std", std), ("weight", weight), ("bias", bias)):
            getattr(self, name).copy_(torch.as_tensor(np.asarray(value), dtype=torch.float32))


def choose_ridge(fit_feats: np.ndarray, fit_t: np.ndarray, select_feats: np.ndarray, select_grams: np.ndarray, decode,
                 score, alphas=ALPHAS) -> tuple[float, float, tuple]:
    """The ridge of `alphas` that scores best on the selection images: (score, alpha, (mean, std, weight, bias)).

    `fit_feats` / `select_feats`: (N, 2, T, D) tile features; `fit_t`: (N, 5) targets in model space; `decode`:
    model space -> grams; `score(true_grams, pred_grams)`: higher is better (the primary metric; None: the first
    alpha, score nan). The features are standardised with the fitting images' mean and std."""
    x = fit_feats.mean(axis=(1, 2), dtype=np.float64)  # the mean over both views' tiles, as mean_tile_feature
    mean, std, fits = ridge_solutions(x, fit_t, alphas)
    if score is None:
        return float("nan"), float(alphas[0]), (mean, std, *fits[0])
    xs = (select_feats.mean(axis=(1, 2), dtype=np.float64) - mean) / std
    scores = [score(select_grams, decode(np.maximum(xs @ w + b, MIN_TARGET))) for w, b in fits]
    best = int(np.argmax(scores))
    return float(scores[best]), float(alphas[best]), (mean, std, *fits[best])


def ridge_offset(base: RidgeBase | None, left: torch.Tensor, right: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """The heads' raw outputs plus the ridge's offset (when the model has one), then softplus."""
    return F.softplus(raw if base is None else raw + base(left, right).to(raw.dtype))
