"""One training epoch and the learning-rate schedule; nothing here knows about folds or files."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from biomass5head.constants import AUX_HEADS, TARGET_SHORT, TARGETS
from biomass5head.device import Runtime
from biomass5head.model.intervals import split_log_probs
from biomass5head.model.predict import forward_batch

logger = logging.getLogger(__name__)


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


def _bin_labels(bins, batch: dict, device):
    """--interval-heads: the bins of the batch's true grams; for a MixUp/CutMix batch the bins of both photos' own
    values and the mix (`losses.BiomassLoss.interval_loss`)."""
    if "mix_targets" in batch:
        pair = batch["mix_targets"].to(device)  # (B, 2, 5): each image's own targets and its partner's
        return bins.labels(pair[:, 0]), bins.labels(pair[:, 1]), batch["mix_lam"].to(device)
    return bins.labels(batch["target"].to(device))


def _count_interval(log_probs, labels, sizes, sums: dict) -> None:
    """Correct interval-bin predictions per target (--interval-heads); for a mixed image, against the bin of the
    photo with the larger share."""
    if isinstance(labels, tuple):
        first, second, lam = labels
        labels = torch.where((lam >= 0.5)[:, None], first, second)
    for j, block in enumerate(split_log_probs(log_probs, sizes)):
        sums[f"correct_interval_{TARGET_SHORT[j]}"] += int((block.argmax(1) == labels[:, j]).sum())
    sums["n_interval"] += len(labels)


def _accuracies(sums: dict) -> dict:
    acc = {f"acc_{h}": sums[f"correct_{h}"] / sums[f"n_{h}"] for h in AUX_HEADS if sums.get(f"n_{h}", 0) > 0}
    if sums.get("n_interval", 0) > 0:
        per = {f"acc_interval_{t}": sums[f"correct_interval_{t}"] / sums["n_interval"] for t in TARGET_SHORT}
        acc.update(acc_interval=sum(per.values()) / len(per), **per)
    return acc


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, rt: Runtime, scaler=None, *, grad_accum=1,
                    grad_clip=0.0, epoch=0, log_every=50, desc="train", dist=None, on_step=None) -> dict:
    """Train for one pass over `loader` on `rt`'s device and precision (`scaler`: the stage's GradScaler or None);
    returns mean loss terms, aux accuracies, optimizer steps and speed.

    Under torchrun `model` is DistributedDataParallel over this rank's share of every batch: micro-steps of a
    gradient accumulation skip the gradient exchange (`no_sync`), and with `dist` the returned losses, accuracies
    and speed are those of all ranks together. `on_step()` runs after every optimizer step (e.g. a weight average)."""
    model.train()
    device, autocast = rt.device, rt.autocast()
    transform, bins = loss_fn.transform, getattr(loss_fn, "interval_bins", None)
    sums, n_seen, n_steps, data_time = defaultdict(float), 0, 0, 0.0
    start = tick = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", dynamic_ncols=True)
    for step, batch in enumerate(bar):
        data_time += time.perf_counter() - tick
        target = transform.encode(batch["target"].to(device))
        labels = _aux_labels(batch, device)
        bin_labels = _bin_labels(bins, batch, device) if bins is not None else None
        stepping = (step + 1) % grad_accum == 0 or step + 1 == n_batches
        with model.no_sync() if not stepping and hasattr(model, "no_sync") else contextlib.nullcontext():
            with autocast:
                out = forward_batch(model, batch, device)
            aux_logits = {h: out[h].float() for h in AUX_HEADS if h in out} or None
            loss, terms = loss_fn(out.get("members", out["reg"]).float(), target, aux_logits,
                                  labels if aux_logits else None,
                                  out.get("interval"), bin_labels)
            if not torch.isfinite(loss):
                detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}: {detail}")
            scaled = loss / grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if stepping:
            _optimizer_step(optimizer, scaler, grad_clip)
            scheduler.step()
            if on_step is not None:
                on_step()
            n_steps += 1
        bs = target.shape[0]
        n_seen += bs
        for k, v in terms.items():
            sums[k] += float(v) * bs
        _count_correct(out, labels, sums)
        if bins is not None:
            _count_interval(out["interval"].detach(), bin_labels, bins.sizes, sums)
        rate = n_seen / max(1e-9, time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}", refresh=False)  # tqdm redraws on its own clock
        if log_every and (step + 1) % log_every == 0:
            logger.info("epoch %d step %d/%d loss %.4f lr %.2e %.1f img/s data %.1fs", epoch, step + 1, n_batches,
                        loss.item(), optimizer.param_groups[0]["lr"], rate, data_time)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    if dist is not None and dist.enabled:  # every rank's samples: sums and counts added over the ranks
        keys = sorted(sums)
        total = dist.all_sum([sums[k] for k in keys] + [n_seen])
        sums, n_seen = defaultdict(float, zip(keys, total[:-1], strict=True)), int(total[-1])
    result = {k: sums[k] / max(1, n_seen) for k in terms}
    result.update(_accuracies(sums))
    result.update(optimizer_steps=n_steps, seconds=seconds, samples_per_s=n_seen / max(1e-9, seconds),
                  data_time=data_time)
    return result


def _optimizer_step(optimizer, scaler, grad_clip: float) -> None:
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


def epoch_row(epoch: int, stage: str, lrs: dict, tr: dict, val: dict, improved: bool) -> dict:
    """One row of log_fold{k}.csv: learning rates, training losses, validation scores (post-processed, and raw)."""
    row = {"epoch": epoch, "stage": stage, **lrs}
    row.update({f"train_{k}": v for k, v in tr.items() if k not in ("seconds", "samples_per_s", "data_time")})
    row["val_weighted_r2_raw"] = val["raw"]["weighted_r2"]
    row["val_weighted_r2"] = val["post"]["weighted_r2"]
    row["val_weighted_r2_mean_per_target"] = val["post"]["weighted_r2_mean_per_target"]
    for name, short in zip(TARGETS, TARGET_SHORT, strict=True):
        row[f"val_r2_{short}"] = val["post"]["per_target"][name]["r2"]
    row.update(val["acc"])
    row.update(seconds=tr["seconds"], samples_per_s=tr["samples_per_s"], best=improved)
    return row
