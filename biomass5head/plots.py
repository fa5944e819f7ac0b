"""Figures of a run: learning curves per fold and predicted-vs-true per target."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: runs on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from biomass5head.constants import TARGET_SHORT, TARGETS  # noqa: E402
from biomass5head.fileio import atomic_path  # noqa: E402


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_learning_curves(logs: dict, path) -> None:
    """Training loss and validation weighted R2 per epoch, one line per fold. `logs`: {fold: DataFrame}."""
    fig, (ax_loss, ax_r2) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, df in sorted(logs.items()):
        ax_loss.plot(df["epoch"], df["train_total"], marker="o", ms=3, label=f"fold {fold}")
        ax_r2.plot(df["epoch"], df["val_weighted_r2"], marker="o", ms=3, label=f"fold {fold}")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss (model space)")
    ax_r2.set(title="validation weighted R² (grams, post-processed)", xlabel="epoch", ylabel="R²")
    for ax in (ax_loss, ax_r2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_pred_vs_true(true: np.ndarray, pred: np.ndarray, path, title: str = "") -> None:
    """Scatter of predicted against true grams for each of the five targets, with the identity line."""
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(4 * len(TARGETS), 4))
    for k, ax in enumerate(axes):
        hi = float(max(true[:, k].max(), pred[:, k].max(), 1e-6)) * 1.05
        ax.scatter(true[:, k], pred[:, k], s=10, alpha=0.6)
        ax.plot([0, hi], [0, hi], color="grey", lw=1, ls="--")
        ax.set(title=TARGET_SHORT[k], xlabel="true (g)", ylabel="predicted (g)", xlim=(0, hi), ylim=(0, hi))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path)
