"""One training epoch and batched prediction (optionally with flip TTA); nothing here knows about folds or files."""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

AUX_HEADS = ("state", "month", "species")


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.01):
    """Per-step LR multiplier: linear warmup to 1 over `warmup_steps`, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _aux_labels(batch: dict, device) -> dict:
    return {h: batch[h].to(device) for h in AUX_HEADS if h in batch}


def _count_correct(out: dict, labels: dict, sums: dict) -> None:
    for head in AUX_HEADS:
        if head not in out or head not in labels:
            continue
        valid = labels[head] >= 0
        sums[f"n_{head}"] += int(valid.sum())
        sums[f"correct_{head}"] += int((out[head].argmax(1)[valid] == labels[head][valid]).sum())


def _accuracies(sums: dict) -> dict:
    return {f"acc_{h}": sums[f"correct_{h}"] / sums[f"n_{h}"] for h in AUX_HEADS if sums.get(f"n_{h}", 0) > 0}


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, device, autocast, scaler=None, *, grad_accum=1,
                    grad_clip=0.0, epoch=0, log_every=50, desc="train") -> dict:
    """Train for one pass over `loader`; returns mean loss terms, aux accuracies, optimizer steps and speed."""
    model.train()
    transform = loss_fn.transform
    sums, n_seen, n_steps, data_time = defaultdict(float), 0, 0, 0.0
    start = tick = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", dynamic_ncols=True)
    for step, batch in enumerate(bar):
        data_time += time.perf_counter() - tick
        target = transform.encode(batch["target"].to(device))
        labels = _aux_labels(batch, device)
        with autocast:
            out = forward_batch(model, batch, device)
        aux_logits = {h: out[h].float() for h in AUX_HEADS if h in out} or None
        loss, terms = loss_fn(out["reg"].float(), target, aux_logits, labels if aux_logits else None)
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}: {detail}")
        scaled = loss / grad_accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if (step + 1) % grad_accum == 0 or step + 1 == n_batches:
            _optimizer_step(model, optimizer, scaler, grad_clip)
            scheduler.step()
            n_steps += 1
        bs = target.shape[0]
        n_seen += bs
        for k, v in terms.items():
            sums[k] += float(v) * bs
        _count_correct(out, labels, sums)
        rate = n_seen / max(1e-9, time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}", refresh=False)  # tqdm redraws on its own clock
        if log_every and (step + 1) % log_every == 0:
            logger.info("epoch %d step %d/%d loss %.4f lr %.2e %.1f img/s data %.1fs", epoch, step + 1, n_batches,
                        loss.item(), optimizer.param_groups[0]["lr"], rate, data_time)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    result = {k: sums[k] / max(1, n_seen) for k in terms}
    result.update(_accuracies(sums))
    result.update(optimizer_steps=n_steps, seconds=seconds, samples_per_s=n_seen / max(1e-9, seconds),
                  data_time=data_time)
    return result


def _optimizer_step(model, optimizer, scaler, grad_clip: float) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip and grad_clip > 0 and params:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def forward_batch(model, batch: dict, device, flip: bool | None = None, grid=(2, 2)) -> dict:
    """Model outputs for a batch of pixels (`left`, `right` tiles) or of cached features (`left_feats`,
    `right_feats`, which skip the backbone). `flip`: None, True (horizontal) or False (vertical) for pixel TTA."""
    if "left_feats" in batch:
        return model.forward_features(batch["left_feats"].to(device, non_blocking=True),
                                      batch["right_feats"].to(device, non_blocking=True))
    left = batch["left"].to(device, non_blocking=True)
    right = batch["right"].to(device, non_blocking=True)
    if flip is not None:
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
def predict(model, loader, device, autocast, transform, *, grid=(2, 2), tta=False, desc="predict") -> dict:
    """Predictions in grams for every item of `loader`, in dataset order.

    Returns `pred` (N, 5) grams, `probs` {head: (N, C)} softmax probabilities of the aux heads (empty without
    them), `index` (N,) and `true` (N, 5) grams. With `tta`, original, horizontal and vertical flips of both
    views are averaged in grams.
    """
    model.eval()
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
            preds.append(torch.stack(grams).mean(0).cpu().numpy())
            for h, p in head_probs.items():
                probs[h].append(torch.stack(p).mean(0).cpu().numpy())
            index.append(np.asarray(batch["index"]))
            true.append(batch["target"].numpy())
    finally:  # a worker that failed (e.g. an unreadable photo) is shut down now, not whenever the GC finds it
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    return {
        "pred": np.concatenate(preds).astype(np.float64),
        "probs": {h: np.concatenate(p) for h, p in probs.items()},
        "index": np.concatenate(index),
        "true": np.concatenate(true).astype(np.float64),
    }
