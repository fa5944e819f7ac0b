"""Non-linear models beside the ridge probe on the same frozen features, folds and inner splits (docs/MODEL_QUALITY.md,
"Second round"): the numbers behind the decision to keep them out of the recipe. Prints one line per data set.

    python benchmarks/bench_nonlinear.py --data data/realistic_s1 data/realistic_s2 --img-size 112

Features: frozen ViT-S/14 (the imported weights), grid 2x2, the CLS token and the 8x8 patch tokens of every tile
(kept in memory, not in the feature cache). Folds: 5 by group_month, seed 18 (the runs' default); each fold's inner
split as `--select-on inner` draws it. Models:
- probe: `infer/linear_probe.ridge_oof` on the CLS tiles (pooling, space and alpha chosen on the inner split);
- patch ridge: the same probe on the patch tokens (mean, or mean and max, over all of them);
- density: an MLP maps each patch token to grams of Green, Dead and Clover (softplus); a photo's grams are the mean
  over its tokens, GDM and Total their sums; sqrt-space loss with the metric's weights; trained on the fold's
  images outside the inner split, the epoch chosen on the inner split;
- kernel ridge: RBF on the standardised mean CLS feature, sqrt grams, gamma and alpha chosen on the inner split,
  refitted on the whole training fold.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from biomass5head.constants import COMPETITION_WEIGHTS, TARGETS
from biomass5head.data.folds import inner_split, make_folds
from biomass5head.data.images import TileSpec, load_views
from biomass5head.data.tables import load_train
from biomass5head.infer.linear_probe import ridge_oof
from biomass5head.metrics import weighted_r2
from biomass5head.model.backbone import create_backbone

WEIGHTS = "weights/vit_small_patch14_dinov2.imgfocus.safetensors"
GAMMAS, KRR_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0), (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@torch.inference_mode()
def tokens(paths, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, 4, D) CLS tokens and (N, 8 * P, D) patch tokens (P <= 64: pooled to at most 8x8 per tile)."""
    model = create_backbone("vit_small_patch14_dinov2.lvd142m", img_size, weights_path=WEIGHTS).eval()
    spec = TileSpec((2, 2), img_size, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    g = img_size // 14
    cls, patches = [], []
    for path in paths:
        left, right = load_views(path, (2, 2), img_size)
        out = model.forward_features(torch.cat([spec.to_tensor(left), spec.to_tensor(right)])).float()
        grid = out[:, model.num_prefix_tokens:].reshape(8, g, g, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.adaptive_avg_pool2d(grid, min(g, 8))
        cls.append(out[:, 0].reshape(2, 4, -1).numpy())
        patches.append(grid.flatten(2).transpose(1, 2).reshape(-1, grid.shape[1]).numpy())
    return np.stack(cls), np.stack(patches)


def density_fold(x_fit, y_fit, x_sel, y_sel, x_test, epochs=150, seed=0) -> np.ndarray:
    mu, sd = x_fit.reshape(-1, x_fit.shape[-1]).mean(0), x_fit.reshape(-1, x_fit.shape[-1]).std(0) + 1e-6
    fit, sel, test = (torch.tensor((v - mu) / sd, dtype=torch.float32) for v in (x_fit, x_sel, x_test))
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(fit.shape[-1], 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
    unit = torch.tensor(y_fit[:, :3].mean(0) + 1.0, dtype=torch.float32)
    w = torch.tensor(COMPETITION_WEIGHTS, dtype=torch.float32)

    def grams(x):
        g, d, c = (torch.nn.functional.softplus(net(x)).mean(1) * unit).unbind(1)
        return torch.stack([g, d, c, g + c, g + d + c], 1)

    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    y = torch.tensor(y_fit, dtype=torch.float32)
    best, state = -np.inf, None
    for _ in range(epochs):
        for b in torch.randperm(len(fit)).split(32):
            opt.zero_grad()
            (((torch.sqrt(grams(fit[b]) + 1e-4) - torch.sqrt(y[b])) ** 2) * w).sum(1).mean().backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            score = weighted_r2(y_sel, grams(sel).double().numpy())
        if score > best:
            best, state = score, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    with torch.no_grad():
        return grams(test).double().numpy()


def krr(x_fit, t_fit, x_eval, gamma, alpha) -> np.ndarray:
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-8
    a, b = (x_fit - mu) / sd, (x_eval - mu) / sd

    def kernel(p, q):
        sq = (p ** 2).sum(1)[:, None] + (q ** 2).sum(1)[None] - 2 * p @ q.T
        return np.exp(-gamma / p.shape[1] * np.maximum(sq, 0))

    coef = np.linalg.solve(kernel(a, a) + alpha * np.eye(len(a)), t_fit - t_fit.mean(0))
    return np.square(np.maximum(kernel(b, a) @ coef + t_fit.mean(0), 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--img-size", type=int, default=112)
    args = p.parse_args()
    for data in args.data:
        start = time.perf_counter()
        df = load_train(data)
        y = df[list(TARGETS)].to_numpy(np.float64)
        folds = make_folds(df, "group_month", 5, 18)
        inner = {k: inner_split(df[folds != k], "group_month", 0.2, 18 + 100 * k) for k in range(5)}
        cls, patches = tokens(df["abs_path"], args.img_size)
        probe = ridge_oof(cls, y, folds, inner)[0]
        patch_ridge = ridge_oof(patches[:, None], y, folds, inner)[0]
        mean_cls = cls.reshape(len(y), -1, cls.shape[-1]).mean(1)
        dens, kr = np.zeros_like(y), np.zeros_like(y)
        for k in range(5):
            tr, te, h = folds != k, folds == k, inner[k]
            xp, yt = patches[tr], y[tr]
            dens[te] = density_fold(xp[~h], yt[~h], xp[h], yt[h], patches[te])
            xc = mean_cls[tr]
            best = max(((g, a) for g in GAMMAS for a in KRR_ALPHAS),
                       key=lambda ga: weighted_r2(yt[h], krr(xc[~h], np.sqrt(yt[~h]), xc[h], *ga)))
            kr[te] = krr(xc, np.sqrt(yt), mean_cls[te], *best)
        scores = {name: weighted_r2(y, pred) for name, pred in
                  (("probe", probe), ("patch ridge", patch_ridge), ("density", dens), ("kernel ridge", kr))}
        print(f"{Path(data).name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
