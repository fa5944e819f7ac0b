"""Training losses: per-target regression (MSE / Huber for Dead, optional focal weighting), the biomass
constraint, the dead-aware loss and the auxiliary cross-entropies.

Every term reported by ``BiomassLoss`` is its *contribution* to the total (already multiplied by its
weight), so ``total == regression + constraint + dead_aware + sum(aux_*) (+ interval)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biomass5head.constants import AUX_HEADS, CLOVER, DEAD, GDM, GREEN, IGNORE_INDEX, TARGETS, TOTAL
from biomass5head.model.intervals import IntervalBins, split_log_probs
from biomass5head.model.targets import TargetTransform

# Huber delta for Dead in model space, where targets are scaled to a mean of about 1: errors beyond one
# fold-mean of Dead grow linearly, so Dead's few very large values do not dominate.
DEAD_HUBER_DELTA = 1.0
# Huber delta of the dead-aware loss in log1p(grams) space: errors beyond a factor of e grow linearly.
DEAD_AWARE_HUBER_DELTA = 1.0
# Weight of the dead-aware tie (Dead vs Total - GDM) relative to the dead-aware log1p term.
DEAD_TIE_WEIGHT = 0.5
FOCAL_GAMMA = 1.0
FOCAL_EPS = 1e-6


def scaled_huber(err: torch.Tensor, delta: float) -> torch.Tensor:
    """Element-wise ``2 * huber(err, delta)``: equals ``err**2`` for |err| <= delta (so it matches MSE for small
    errors) and ``2 * delta * |err| - delta**2`` beyond it."""
    return 2.0 * F.huber_loss(err, torch.zeros_like(err), reduction="none", delta=delta)


def focal_weights(err: torch.Tensor, gamma: float = FOCAL_GAMMA, eps: float = FOCAL_EPS) -> torch.Tensor:
    """Per-element focal weights, per column over the batch (dim 0), detached:
    ``w_i = (|e_i| + eps)^gamma / mean_j (|e_j| + eps)^gamma``, so mean w = 1 and larger errors weigh more.
    With gamma = 1 the weighted squared error is ``mean|e|^3 / mean|e|``. eps keeps an all-zero column at w = 1."""
    w = (err.detach().abs() + eps) ** gamma
    return w / w.mean(dim=0, keepdim=True)


def elementwise_loss(err: torch.Tensor, huber_delta: float | None, focal: bool) -> torch.Tensor:
    """Squared error, or scaled Huber when ``huber_delta`` is set, optionally focal-weighted; same shape as err."""
    loss = err**2 if huber_delta is None else scaled_huber(err, huber_delta)
    return loss * focal_weights(err) if focal else loss


def aux_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled rows (``IGNORE_INDEX`` skipped); 0 (still attached to the graph, so DDP
    sees the head used) when every label of the batch is ignored, where F.cross_entropy would return NaN."""
    labels = labels.long()
    if not bool((labels != IGNORE_INDEX).any()):
        return (logits * 0.0).sum()
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


class BiomassLoss(nn.Module):
    """Weighted regression + constraint + dead-aware + auxiliary + interval losses for the five-head model.

    regression: ``sum_k w_k * mean_b L_k / sum_k w_k`` over targets k, with ``L`` the squared error in model
    space, except Dead, which uses ``scaled_huber`` (delta ``DEAD_HUBER_DELTA``) unless ``huber_for_dead=False``.
    With ``use_focal`` each element is multiplied by ``focal_weights`` (computed per target over the batch).

    constraint: in grams (predictions decoded by the transform, gradients flow through the decode),
    ``r1 = GDM - (Green + Clover)``, ``r2 = Total - (GDM + Dead)``, each divided by ``transform.gram_scale``
    (the training fold's mean Total, fixed, so the term does not depend on the batch), squared, averaged over
    the batch and both residuals, times ``constraint_weight``.

    dead_aware (``use_dead_aware``): Dead leaves the regression sum; in its place, with Dead's normalised
    weight ``w_D / sum w``: ``L(log1p D_pred - log1p D_true) + DEAD_TIE_WEIGHT * L(log1p D_pred -
    log1p max(0, Total_pred - GDM_pred))``, L = scaled Huber (delta ``DEAD_AWARE_HUBER_DELTA``; MSE with
    ``huber_for_dead=False``), in grams. The Total - GDM side is detached: the tie teaches the weak Dead head
    from the stronger Total/GDM heads without pulling Total (half the competition score) towards Dead.

    aux: ``aux_weights[h] * CE(logits_h, labels_h)`` with ``ignore_index=IGNORE_INDEX``.

    interval (``interval_bins`` set, --interval-heads): ``interval_weight`` times the (unweighted) mean over the five
    targets of the cross-entropy of each target's interval head against the bin of its true value (of both photos'
    values, weighted by the mix, for a MixUp/CutMix image).
    """

    def __init__(
        self,
        transform: TargetTransform,
        target_weights=(0.2,) * 5,
        constraint_weight: float = 0.05,
        use_focal: bool = False,
        use_dead_aware: bool = False,
        huber_for_dead: bool = True,
        aux_weights: dict[str, float] | None = None,
        interval_bins: IntervalBins | None = None,
        interval_weight: float = 0.3,
    ):
        super().__init__()
        weights = torch.as_tensor(target_weights, dtype=torch.float32).reshape(-1)
        if weights.numel() != len(TARGETS) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"target_weights must be {len(TARGETS)} non-negative values with a positive sum, "
                             f"got {list(target_weights)}")
        if constraint_weight < 0:
            raise ValueError(f"constraint_weight must be >= 0, got {constraint_weight}")
        if aux_weights is not None and set(aux_weights) != set(AUX_HEADS):
            raise ValueError(f"aux_weights must have exactly the keys {tuple(AUX_HEADS)}, got {sorted(aux_weights)}")
        self.transform = transform
        self.register_buffer("target_weights", weights, persistent=False)
        self.constraint_weight = float(constraint_weight)
        self.use_focal = bool(use_focal)
        self.use_dead_aware = bool(use_dead_aware)
        self.huber_for_dead = bool(huber_for_dead)
        self.aux_weights = None if aux_weights is None else {h: float(aux_weights[h]) for h in AUX_HEADS}
        if interval_weight < 0:
            raise ValueError(f"interval_weight must be >= 0, got {interval_weight}")
        self.interval_bins = interval_bins
        self.interval_weight = float(interval_weight)

    def regression_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted per-target regression loss in model space (Dead left out under dead-aware)."""
        err = pred - target  # (B, 5)
        loss = elementwise_loss(err, None, self.use_focal)
        if self.huber_for_dead:
            dead = elementwise_loss(err[:, DEAD : DEAD + 1], DEAD_HUBER_DELTA, self.use_focal)
            loss = torch.cat([loss[:, :DEAD], dead, loss[:, DEAD + 1 :]], dim=1)
        weights = self.target_weights.to(pred.device)
        if self.use_dead_aware:
            weights = weights * (torch.arange(len(TARGETS), device=pred.device) != DEAD)
        return (loss.mean(dim=0) * weights).sum() / self.target_weights.sum()

    def constraint_loss(self, pred_g: torch.Tensor) -> torch.Tensor:
        """Mean squared, gram-scale-normalised residual of GDM = Green + Clover and Total = GDM + Dead."""
        r1 = pred_g[:, GDM] - (pred_g[:, GREEN] + pred_g[:, CLOVER])
        r2 = pred_g[:, TOTAL] - (pred_g[:, GDM] + pred_g[:, DEAD])
        r = torch.stack([r1, r2], dim=1) / self.transform.gram_scale
        return self.constraint_weight * (r**2).mean()

    def dead_aware_loss(self, pred_g: torch.Tensor, target_g: torch.Tensor) -> torch.Tensor:
        """Dead in log1p(grams) against its truth and against max(0, Total - GDM) predicted (detached)."""
        delta = DEAD_AWARE_HUBER_DELTA if self.huber_for_dead else None
        log_dead = torch.log1p(pred_g[:, DEAD])
        fit = elementwise_loss(log_dead - torch.log1p(target_g[:, DEAD]), delta, self.use_focal).mean()
        implied = torch.log1p((pred_g[:, TOTAL] - pred_g[:, GDM]).clamp(min=0.0)).detach()
        tie = elementwise_loss(log_dead - implied, delta, self.use_focal).mean()
        share = self.target_weights[DEAD] / self.target_weights.sum()
        return share * (fit + DEAD_TIE_WEIGHT * tie)

    def aux_losses(self, aux_logits, aux_labels) -> dict[str, torch.Tensor]:
        """Weighted cross-entropy per auxiliary head; a clear error when the aux inputs are missing, because
        a batch layout that dropped them must not silently leave the heads untrained."""
        if aux_logits is None or aux_labels is None:
            raise ValueError("aux heads are on (aux_weights set) but aux_logits / aux_labels were not given")
        out = {}
        for head in AUX_HEADS:
            if head not in aux_logits or head not in aux_labels:
                raise ValueError(f"aux head {head!r} missing from aux_logits or aux_labels")
            labels = aux_labels[head].to(aux_logits[head].device)
            out[f"aux_{head}"] = self.aux_weights[head] * aux_cross_entropy(aux_logits[head], labels)
        return out

    def interval_loss(self, log_probs: torch.Tensor, labels) -> torch.Tensor:
        """``interval_weight`` times the mean over targets of the interval heads' cross-entropy. `log_probs` (B, sum of
        bins) as the model gives them; `labels` (B, 5) from ``interval_bins.labels``, or for a MixUp/CutMix batch
        ``(labels_a, labels_b, lam)``: the bins of both photos' own values, each side's cross-entropy weighted by its
        share of the mix (the bin of a mixed value would be neither photo's)."""
        if log_probs is None or labels is None:
            raise ValueError("interval heads are on (interval_bins set) but their outputs / labels were not given")
        first, second, lam = labels if isinstance(labels, tuple) else (labels, labels, None)
        ce = []
        for j, block in enumerate(split_log_probs(log_probs.float(), self.interval_bins.sizes)):
            nll = F.nll_loss(block, first[:, j].long().to(block.device), reduction="none")
            if lam is not None:
                lam_ = lam.to(block.device).float()
                nll = lam_ * nll + (1 - lam_) * F.nll_loss(block, second[:, j].long().to(block.device),
                                                           reduction="none")
            ce.append(nll.mean())
        return self.interval_weight * torch.stack(ce).mean()

    def forward(self, pred, target, aux_logits=None, aux_labels=None, interval_log_probs=None, interval_labels=None):
        """``pred``, ``target``: (B, 5) in model space (``pred`` (K, B, 5): K copies of the heads, each scored
        against ``target``); with interval heads also their log-probabilities and the
        bins of the true grams (``interval_bins.labels``). Returns ``(loss, terms)``: the scalar total (NaN/inf
        propagate, so the caller can stop on a non-finite loss) and a dict of detached per-term contributions."""
        if pred.ndim == 3 and pred.shape[1:] == target.shape:  # --head-seeds: (K, B, 5), the mean of K losses
            pred, target = pred.flatten(0, 1), target.repeat(pred.shape[0], 1)
        if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != len(TARGETS):
            raise ValueError(f"pred and target must both be (B, {len(TARGETS)}), got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        # Losses in float32 even under autocast: bfloat16 squares and expm1 lose too much precision.
        pred, target = pred.float(), target.float()
        regression = self.regression_loss(pred, target)
        pred_g = self.transform.decode(pred)
        constraint = self.constraint_loss(pred_g)
        if self.use_dead_aware:
            dead_aware = self.dead_aware_loss(pred_g, self.transform.decode(target))
        else:
            dead_aware = pred.new_zeros(())
        aux = {} if self.aux_weights is None else self.aux_losses(aux_logits, aux_labels)
        if self.interval_bins is not None:
            aux["interval"] = self.interval_loss(interval_log_probs, interval_labels)
        total = regression + constraint + dead_aware + sum(aux.values(), pred.new_zeros(()))
        terms = {"regression": regression, "constraint": constraint, "dead_aware": dead_aware, **aux,
                 "total": total}
        return total, {k: v.detach() for k, v in terms.items()}
