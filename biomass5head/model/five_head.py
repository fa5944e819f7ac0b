"""The 5-head model: a timm ViT encodes every tile of both stereo views, FiLM lets each view condition on the
other, attention pooling summarises each view, and five independent heads regress the biomass targets.

Shapes: `(B, T, 3, S, S)` per view (batch, tiles per view, channels, `--img-size`); D = backbone.num_features.
Backbone creation and weights live in `model.backbone`; `build_model` makes the model a `RunConfig` describes.
"""
from __future__ import annotations

from collections.abc import Iterator

import timm
import timm.data
import torch
import torch.nn as nn

from biomass5head.config import RunConfig
from biomass5head.constants import AUX_HEADS, TARGETS
from biomass5head.model.backbone import create_backbone
from biomass5head.model.intervals import IntervalBins
from biomass5head.model.ridge_base import RidgeBase, ridge_offset


class FiLM(nn.Module):
    """Feature-wise linear modulation of one view's tile features by the mean of the other view's."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(dim // 2, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * dim))
        # Zero last layer: gamma = beta = 0, so FiLM starts as the identity and the pretrained features reach the
        # heads unchanged; the modulation is learned as a residual instead of scrambling features at step 0.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) modulated as x * (1 + gamma) + beta, with gamma, beta from context (B, T', D)."""
        gamma, beta = self.mlp(context.mean(dim=1)).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return x * (1 + gamma) + beta


class AttentionPool(nn.Module):
    """Weighted mean of a view's tiles with learned softmax weights (attention-based MIL pooling)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(dim // 4, 1)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, 1): each tile's share of the pooled feature (summing to 1 over T)."""
        return self.score(x).softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, D)."""
        return (self.weights(x) * x).sum(dim=1)


class RegressionHead(nn.Module):
    """One target's small MLP: hidden -> hidden/2 -> 1 raw output (softplus is applied by the model)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        mid = max(dim // 2, 1)
        self.net = nn.Sequential(nn.Linear(dim, mid), nn.GELU(), nn.Dropout(dropout), nn.Linear(mid, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1)


class HeadCopy(nn.Module):
    """One more independently initialised copy of the heads (FiLM, pooling, projection, five regressions) for
    `--head-seeds`: the model's prediction is the mean over its copies, each trained on its own loss."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float, use_film: bool, attention_pool: bool,
                 zero_last: bool):
        super().__init__()
        self.film, self.pool, self.proj, self.heads = _head_modules(dim, hidden_dim, dropout, use_film,
                                                                    attention_pool, zero_last)


def _head_modules(dim: int, hidden_dim: int, dropout: float, use_film: bool, attention_pool: bool, zero_last: bool):
    """(FiLM or None, attention pool or None, projection, five heads): everything after the backbone that regresses.
    `zero_last` (--ridge-base): the heads' last layers start at zero, so the model starts from the ridge."""
    film = FiLM(dim) if use_film else None
    pool = AttentionPool(dim) if attention_pool else None
    proj = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))
    heads = nn.ModuleList(RegressionHead(hidden_dim, dropout) for _ in TARGETS)
    if zero_last:
        for head in heads:
            nn.init.zeros_(head.net[-1].weight)
            nn.init.zeros_(head.net[-1].bias)
    return film, pool, proj, heads


def _regress(m, left_feats: torch.Tensor, right_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, hidden), raw (B, 5)) of one set of heads `m` (the model itself, or a HeadCopy)."""
    lf, rf = left_feats, right_feats
    if m.film is not None:
        lf, rf = m.film(lf, right_feats), m.film(rf, left_feats)  # each conditioned on the other view
    lp, rp = (m.pool(lf), m.pool(rf)) if m.pool is not None else (lf.mean(dim=1), rf.mean(dim=1))
    hidden = m.proj(torch.cat([lp, rp], dim=-1))  # (B, 2D) -> (B, hidden)
    return hidden, torch.cat([head(hidden) for head in m.heads], dim=-1)


class FiveHeadModel(nn.Module):
    """Stereo tiles -> backbone -> FiLM -> pooling -> shared projection -> five non-negative regressions
    (+ optional State / Month / Species-group logits)."""

    def __init__(self, backbone: nn.Module, *, dropout: float = 0.2, hidden_ratio: float = 0.5,
                 use_film: bool = True, attention_pool: bool = True, use_aux_heads: bool = False,
                 grad_ckpt: bool = False, ridge_base: bool = False, tile_feature: str = "cls",
                 interval_sizes: tuple[int, ...] | None = None, head_seeds: int = 1):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"--dropout {dropout} must be in [0, 1)")
        if hidden_ratio <= 0:
            raise ValueError(f"--hidden-ratio {hidden_ratio} must be positive")
        if head_seeds < 1:
            raise ValueError(f"--head-seeds {head_seeds} must be >= 1")
        self.backbone = backbone
        if tile_feature not in ("cls", "patch_mean", "cls_patch_mean"):
            raise ValueError(f"--tile-feature must be cls, patch_mean or cls_patch_mean, got {tile_feature!r}")
        self.tile_feature = tile_feature
        dim = int(backbone.num_features) * (2 if tile_feature == "cls_patch_mean" else 1)  # what a tile gives
        self.feat_dim = dim
        self.hidden_dim = max(int(2 * dim * hidden_ratio), 1)
        self.use_aux_heads = use_aux_heads
        # Absent modules (not identity ones) so that --no-film / --no-attention-pool leave no parameters behind.
        # --ridge-base: a closed-form ridge (fitted by the trainer) that the heads correct, starting from zero.
        kw = dict(dim=dim, hidden_dim=self.hidden_dim, dropout=dropout, use_film=use_film,
                  attention_pool=attention_pool, zero_last=ridge_base)
        self.film, self.pool, self.proj, self.heads = _head_modules(**kw)
        self.ridge = RidgeBase(dim, len(TARGETS)) if ridge_base else None
        # --head-seeds K: K - 1 more copies of the heads, initialised from the next random draws; prediction = mean.
        self.copies = nn.ModuleList(HeadCopy(**kw) for _ in range(head_seeds - 1)) if head_seeds > 1 else None
        self.aux_heads = nn.ModuleDict(
            {k: nn.Sequential(nn.Dropout(dropout), nn.Linear(self.hidden_dim, len(h.classes)))
             for k, h in AUX_HEADS.items()}
        ) if use_aux_heads else None
        # --interval-heads: one linear classifier per target over its interval bins (sizes from the fold's bins).
        self.interval_sizes = tuple(int(n) for n in interval_sizes) if interval_sizes else None
        self.interval_heads = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(self.hidden_dim, n)) for n in self.interval_sizes
        ) if self.interval_sizes else None
        self._backbone_trainable = True
        self._tile_features = self._backbone_features  # compile_backbone() swaps in a compiled one
        if grad_ckpt:
            backbone.set_grad_checkpointing(True)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Normalisation mean and std the backbone expects (timm's data config), in 0-1 pixel units."""
        data_cfg = timm.data.resolve_data_config({}, model=self.backbone)
        return tuple(data_cfg["mean"]), tuple(data_cfg["std"])

    # --- backbone freezing -------------------------------------------------------------------------------
    @property
    def backbone_trainable(self) -> bool:
        return self._backbone_trainable

    def set_backbone_trainable(self, flag: bool) -> None:
        """Freeze (False) or unfreeze (True) the backbone; a frozen backbone stays in eval mode."""
        self._backbone_trainable = bool(flag)
        for p in self.backbone.parameters():
            p.requires_grad_(self._backbone_trainable)
        self.backbone.train(self.training and self._backbone_trainable)

    def train(self, mode: bool = True) -> FiveHeadModel:
        """Like nn.Module.train, but a frozen backbone stays in eval mode: its dropout / drop-path must not
        change features that are meant to be fixed (and possibly cached)."""
        super().train(mode)
        if not self._backbone_trainable:
            self.backbone.eval()
        return self

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the backbone (FiLM, pooling, projection, heads)."""
        return (p for n, p in self.named_parameters() if not n.startswith("backbone."))

    def compile_backbone(self) -> None:
        """--compile: the tile encoder runs through torch.compile (weights and state-dict keys unchanged)."""
        self._tile_features = torch.compile(self._backbone_features)

    # --- forward -----------------------------------------------------------------------------------------
    def _backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)  # (N, prefix + patches, D), after the final norm
        if self.tile_feature == "cls":
            return self.backbone.forward_head(tokens, pre_logits=True)
        patch_mean = tokens[:, int(getattr(self.backbone, "num_prefix_tokens", 1)):].mean(dim=1)
        if self.tile_feature == "patch_mean":
            return patch_mean
        return torch.cat([self.backbone.forward_head(tokens, pre_logits=True), patch_mean], dim=-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tile features: x (N, 3, S, S) -> (N, feat_dim): with --tile-feature cls the backbone's pre-logits output
        (the CLS token for DINOv2), patch_mean the mean of its patch tokens, cls_patch_mean both concatenated."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._backbone_trainable):
            return self._tile_features(x)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
        """left, right (B, T, 3, S, S) -> dict of `reg` (B, 5), with aux heads `state`/`month`/`species` logits,
        with interval heads `interval` (B, sum of bins) log-probabilities (`intervals.split_log_probs` splits them)."""
        if left.shape != right.shape or left.dim() != 5:
            raise ValueError(f"left and right must both be (B, T, 3, S, S); got {tuple(left.shape)} and "
                             f"{tuple(right.shape)}")
        b, t = left.shape[:2]
        # One backbone call for every tile of both views: far better batched than 2*T small calls.
        tiles = torch.cat([left, right], dim=0).flatten(0, 1)  # (2*B*T, 3, S, S)
        feats = self.encode(tiles).view(2, b, t, -1)  # (2, B, T, D)
        return self.forward_features(feats[0], feats[1])

    def tile_weights(self, left_feats: torch.Tensor, right_feats: torch.Tensor) -> torch.Tensor:
        """(B, 2, T): how much each tile of each view counts in that view's pooled feature (the attention pool's
        weights after FiLM; uniform with --no-attention-pool)."""
        lf, rf = left_feats, right_feats
        if self.film is not None:
            lf, rf = self.film(lf, right_feats), self.film(rf, left_feats)
        if self.pool is None:
            return torch.full((lf.shape[0], 2, lf.shape[1]), 1.0 / lf.shape[1], device=lf.device)
        return torch.stack([self.pool.weights(lf)[..., 0], self.pool.weights(rf)[..., 0]], dim=1)

    def forward_features(self, left_feats: torch.Tensor, right_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything after the backbone: left_feats, right_feats (B, T, D) -> the output dict of forward. With
        --head-seeds K, `reg` is the mean of the K copies' predictions and `members` (K, B, 5) holds each one."""
        hidden, raw = _regress(self, left_feats, right_feats)
        if self.copies is not None:  # (K, B, 5): the ridge's offset (B, 5) broadcasts over the copies
            raw = torch.stack([raw] + [_regress(c, left_feats, right_feats)[1] for c in self.copies])
        reg = ridge_offset(self.ridge, left_feats, right_feats, raw)
        out = {"reg": reg} if self.copies is None else {"reg": reg.mean(dim=0), "members": reg}
        if self.aux_heads is not None:
            out.update({k: head(hidden) for k, head in self.aux_heads.items()})
        if self.interval_heads is not None:  # (B, sum of bins): each target's log-probabilities, concatenated
            out["interval"] = torch.cat([head(hidden).float().log_softmax(dim=1) for head in self.interval_heads], 1)
        return out


def _count(params) -> int:
    return sum(p.numel() for p in params)


def describe(model: FiveHeadModel) -> str:
    """One log line of parameter counts: total, trainable, backbone and heads (in millions)."""
    total = _count(model.parameters())
    trainable = _count(p for p in model.parameters() if p.requires_grad)
    backbone = _count(model.backbone_parameters())
    heads = _count(model.head_parameters())
    frozen = "" if model.backbone_trainable else " (backbone frozen)"
    return (f"parameters: total {total / 1e6:.2f}M, trainable {trainable / 1e6:.2f}M, "
            f"backbone {backbone / 1e6:.2f}M, heads {heads / 1e6:.2f}M{frozen}")


def build_model(cfg: RunConfig, pretrained: bool | None = None,
                interval_bins: IntervalBins | None = None) -> FiveHeadModel:
    """The 5-head model of a configuration; `pretrained=False` skips weights (they come from a checkpoint).
    `interval_bins`: the fold's bins, required with --interval-heads (they size the heads)."""
    if cfg.model.interval_heads and interval_bins is None:
        raise ValueError("--interval-heads needs the fold's interval bins to build the model")
    m = cfg.model
    use_pretrained = m.pretrained if pretrained is None else pretrained
    backbone = create_backbone(m.backbone, m.img_size, pretrained=use_pretrained,
                               weights_path=m.backbone_weights if use_pretrained else None)
    return FiveHeadModel(backbone, dropout=m.dropout, hidden_ratio=m.hidden_ratio, use_film=m.film,
                         attention_pool=m.attention_pool, use_aux_heads=m.use_aux_heads, grad_ckpt=m.grad_ckpt,
                         ridge_base=m.ridge_base, tile_feature=m.tile_feature,
                         interval_sizes=interval_bins.sizes if m.interval_heads else None, head_seeds=m.head_seeds)
