"""A model over a DataLoader: the forward pass of one batch (pixels or cached features) and batched prediction in
grams with optional flip TTA. Training (`train.engine`, and validation in `train.trainer`) and inference
(`infer/`) both use it.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from biomass5head.constants import AUX_HEADS
from biomass5head.device import Runtime


def forward_batch(model, batch: dict, device, flip: bool | None = None, grid: tuple[int, int] | None = None) -> dict:
    """Model outputs for a batch of pixels (`left`, `right` tiles) or of cached features (`left_feats`,
    `right_feats`, which skip the backbone). `flip`: None, True (horizontal) or False (vertical) for pixel TTA,
    which needs the tiles' `grid`."""
    if "left_feats" in batch:
        return model.forward_features(batch["left_feats"].to(device, non_blocking=True),
                                      batch["right_feats"].to(device, non_blocking=True))
    left = batch["left"].to(device, non_blocking=True)
    right = batch["right"].to(device, non_blocking=True)
    if flip is not None:
        if grid is None:
            raise ValueError("flipping tiled views needs their grid")
        left, right = flip_tiles(left, grid, flip), flip_tiles(right, grid, flip)
    return model(left, right)


def flip_tiles(x: torch.Tensor, grid, horizontal: bool) -> torch.Tensor:
    """Flip whole views given as row-major tiles (B, T, 3, S, S): flip each tile and mirror the tile order."""
    rows, cols = grid
    b, t, c, h, w = x.shape
    x = x.reshape(b, rows, cols, c, h, w)  # (B, rows, cols, 3, S, S)
    x = x.flip(dims=(2, 5)) if horizontal else x.flip(dims=(1, 4))
    return x.reshape(b, t, c, h, w)


@torch.no_grad()
def predict(model, loader, rt: Runtime, transform, *, grid: tuple[int, int], tta: bool = False,
            desc: str = "predict") -> dict:
    """Predictions in grams for every item of `loader`, in dataset order.

    Returns `pred` (N, 5) grams, `probs` {head: (N, C)} softmax probabilities of the aux heads (empty without
    them; `interval`: the interval heads' bin probabilities, concatenated over the targets), `index` (N,) and
    `true` (N, 5) grams. With `tta`, original, horizontal and vertical flips of both views are averaged in grams.
    """
    model.eval()
    device, autocast = rt.device, rt.autocast()
    views = [None, True, False] if tta else [None]  # None: original; True: horizontal; False: vertical flip
    preds, probs, index, true = [], defaultdict(list), [], []
    batches = iter(loader)
    try:
        for batch in tqdm(batches, desc=desc, leave=False, unit="batch", dynamic_ncols=True):
            if tta and "left" not in batch:
                raise ValueError("flip TTA needs pixels: cached features are averaged over their flip variants instead")
            grams, head_probs = [], defaultdict(list)
            for flip in views:
                with autocast:
                    out = forward_batch(model, batch, device, flip=flip, grid=grid)
                grams.append(transform.decode(out["reg"].float()))
                for h in AUX_HEADS:
                    if h in out:
                        head_probs[h].append(out[h].float().softmax(1))
                if "interval" in out:  # --interval-heads: each target's bin probabilities, concatenated
                    head_probs["interval"].append(out["interval"].float().exp())
            preds.append(torch.stack(grams).mean(0).cpu().numpy())
            for h, p in head_probs.items():
                probs[h].append(torch.stack(p).mean(0).cpu().numpy())
            index.append(np.asarray(batch["index"]))
            true.append(batch["target"].numpy())
    finally:  # a worker that failed (e.g. an unreadable photo) is shut down now, not whenever the GC finds it
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    if not preds:  # an empty share (torchrun validation of fewer images than ranks)
        return {"pred": np.zeros((0, 5)), "probs": {}, "index": np.zeros(0, np.int64), "true": np.zeros((0, 5))}
    return {
        "pred": np.concatenate(preds).astype(np.float64),
        "probs": {h: np.concatenate(p) for h, p in probs.items()},
        "index": np.concatenate(index),
        "true": np.concatenate(true).astype(np.float64),
    }


def gather_predictions(parts: list[dict]) -> dict:
    """One `predict` output from the outputs of several ranks, each over its share of a dataset (torchrun
    validation), back in dataset order by `index`."""
    parts = [p for p in parts if len(p["index"])] or parts[:1]
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index, kind="stable")
    heads = parts[0]["probs"].keys()
    return {"pred": np.concatenate([p["pred"] for p in parts])[order],
            "probs": {h: np.concatenate([p["probs"][h] for p in parts])[order] for h in heads},
            "index": index[order], "true": np.concatenate([p["true"] for p in parts])[order]}
