"""Frozen-feature cache: each photo's tile features, computed once per variant and reused from disk.

A frozen backbone maps the same pixels to the same features every epoch of every fold, in evaluation and in
prediction. The cache stores, per photo and per variant, an array `(2, T, D)` (left and right view, T tiles,
D features) under a folder whose name is a digest of everything that changes features: the backbone name, a
digest of its weights, `--img-size`, `--grid` and the compute dtype. Each file name adds a digest of the photo's
bytes and the variant, so an edited photo misses the cache too.

Variants:
- `id`, `h`, `v`, `hv`: the photo as it is, mirrored left-right, top-bottom, or both (applied to both views,
  exactly what TTA and flip augmentation do to pixels).
- `aug{k}` (k < K): a bank of K pre-augmented draws of the run's full augmentation (geometric and photometric,
  stereo-correct as configured), seeded by the run's seed, k and the photo digest, for runs whose
  augmentation a flip alone cannot represent.
A left/right swap needs no variant: it swaps the two rows of the array.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from biomass5head.data.augment import StereoAugment, hflip_views, vflip_views
from biomass5head.data.images import TileSpec, load_views
from biomass5head.device import Runtime
from biomass5head.fileio import atomic_path, file_sha256

logger = logging.getLogger(__name__)

FLIP_VARIANTS = ("id", "h", "v", "hv")
# Tiles per backbone call when encoding on a CPU: ViT-S/14 at 112-224 px on 2 cores ran 8-25 % slower with 64 tiles
# per call than with 8-16 (benchmarks/bench_train.py); a GPU takes a whole chunk at once.
CPU_TILES_PER_CALL = 16
CACHE_FORMAT = 1


def state_dict_digest(module: torch.nn.Module) -> str:
    """Digest of a module's weights (names, shapes, dtypes and bytes): identical weights, identical digest."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): a 0-dim tensor (e.g. BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def bank_variants(k: int) -> tuple[str, ...]:
    return tuple(f"aug{i}" for i in range(k))


class FeatureCache:
    """On-disk store of `(2, T, D)` float32 tile features keyed by model, photo bytes and variant."""

    def __init__(self, root, *, backbone: str, weights_digest: str, tiles: TileSpec, compute_dtype: str,
                 aug_key: str = "", tile_feature: str = "cls"):
        key = {"format": CACHE_FORMAT, "backbone": backbone, "weights": weights_digest, "img_size": tiles.img_size,
               "grid": list(tiles.grid), "dtype": compute_dtype, "aug": aug_key}
        if tile_feature != "cls":  # (left out for the CLS token, so caches written before the option stay valid)
            key["tile_feature"] = tile_feature
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.key = key
        self.dir = Path(root) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', backbone)}_{digest}"
        self._digests: dict[str, str] = {}

    def photo_digest(self, path) -> str:
        path = str(path)
        if path not in self._digests:
            self._digests[path] = file_sha256(path)[:16]
        return self._digests[path]

    def file(self, path, variant: str) -> Path:
        return self.dir / f"{self.photo_digest(path)}_{variant}.npy"

    def load(self, path, variant: str) -> np.ndarray | None:
        f = self.file(path, variant)
        if not f.exists():
            return None
        try:
            return np.load(f)
        except (ValueError, OSError, EOFError):
            logger.warning("feature cache: unreadable entry %s, recomputing", f)
            return None

    def save(self, path, variant: str, feats: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "key.json"
        if not meta.exists():
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps(self.key, indent=2))
        with atomic_path(self.file(path, variant)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, feats.astype(np.float32))


def _variant_views(views, variant: str, augment: StereoAugment | None, seed: int, digest: str):
    """The (left, right) uint8 views of one variant of a photo."""
    left, right = views
    if variant in ("h", "hv"):
        left, right = hflip_views(left, right)
    if variant in ("v", "hv"):
        left, right = vflip_views(left, right)
    if variant.startswith("aug"):
        # Reseeding per (run seed, k, photo) makes a bank entry reproducible whichever process builds it.
        augment.reseed(int(hashlib.sha256(f"{seed}:{variant}:{digest}".encode()).hexdigest()[:8], 16))
        left, right = augment(left, right)
    return left, right


def ensure_features(cache: FeatureCache, model, paths, variants, *, tiles: TileSpec, runtime: Runtime,
                    batch_size: int, augment: StereoAugment | None = None, seed: int = 0,
                    desc: str = "features") -> dict:
    """Tile features of every photo and variant, from the cache or computed (and stored) now.

    Returns {path: {variant: (2, T, D) float32 array}}. Logs how many entries were reused and computed.
    Under torchrun (`runtime.dist`) every rank computes and stores its share of the missing entries, then every
    rank receives all of them through the process group, so the cache folder need not be shared between machines
    (on each machine the first process stores what the others computed).
    """
    table: dict = {}
    todo: list[tuple[str, str]] = []
    for path in dict.fromkeys(map(str, paths)):
        table[path] = {}
        for variant in variants:
            feats = cache.load(path, variant)
            if feats is None:
                todo.append((path, variant))
            else:
                table[path][variant] = feats
    reused = sum(len(v) for v in table.values())
    dist = runtime.dist
    if dist.enabled:  # every rank must agree on what is missing (a shared folder may gain files meanwhile)
        todo = sorted(set().union(*dist.all_gather(todo)))
    if not todo:
        logger.info("feature cache %s: reused all %d entries", cache.dir, reused)
        return table
    logger.info("feature cache %s: reusing %d entries, computing %d%s", cache.dir, reused, len(todo),
                f" ({dist.world_size} ranks, a share each)" if dist.enabled else "")
    everything, todo = todo, dist.shard(todo)
    start = time.perf_counter()
    if todo:
        _compute(cache, model, todo, table, tiles=tiles, runtime=runtime, batch_size=batch_size, augment=augment,
                 seed=seed, desc=desc)
    seconds = time.perf_counter() - start
    if dist.enabled:
        mine = {(path, variant): table[path][variant] for path, variant in todo}
        for share in dist.all_gather(mine):
            for (path, variant), feats in share.items():
                if variant not in table[path]:
                    table[path][variant] = feats
                    if dist.local_rank == 0 and not cache.file(path, variant).exists():
                        cache.save(path, variant, feats)
    logger.info("feature cache: computed %d entries in %.1fs (%.2f photos/s)", len(everything), seconds,
                len(everything) / max(seconds, 1e-9))
    return table


def _compute(cache: FeatureCache, model, todo, table: dict, *, tiles: TileSpec, runtime: Runtime, batch_size: int,
             augment, seed: int, desc: str) -> None:
    """Encode the (photo, variant) entries of `todo`, store each in the cache and in `table`."""
    model.eval()
    bar = tqdm(total=len(todo), desc=desc, unit="view-pair", dynamic_ncols=True)
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    tile_kw = dict(tiles=tiles, augment=augment, seed=seed, cache=cache)
    # The next chunk's photos decode on a thread (PIL and OpenCV release the GIL) while the backbone encodes this
    # one, so decoding costs no wall time next to the matrix products.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_chunk_tiles, chunks[0], **tile_kw)
        for k, chunk in enumerate(chunks):
            x = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(_chunk_tiles, chunks[k + 1], **tile_kw)
            feats = _encode_tiles(model, x, runtime)
            for (path, variant), f in zip(chunk, feats, strict=True):
                cache.save(path, variant, f)
                table[path][variant] = f
            bar.update(len(chunk))
    bar.close()


def _chunk_tiles(chunk, *, tiles: TileSpec, augment, seed, cache) -> torch.Tensor:
    """Normalised tiles (2 * n, T, 3, S, S) of the (photo, variant) pairs of a chunk, left and right view each."""
    tensors, loaded = [], {}
    for path, variant in chunk:
        if path not in loaded:
            loaded[path] = load_views(path, tiles.grid, tiles.img_size)
        left, right = _variant_views(loaded[path], variant, augment, seed, cache.photo_digest(path))
        tensors += [tiles.to_tensor(view) for view in (left, right)]
    return torch.stack(tensors)


@torch.inference_mode()
def _encode_tiles(model, x: torch.Tensor, rt: Runtime) -> list:
    """The tiles of a chunk through the backbone: (n, 2, T, D) float32 features as a list of n.

    On a CPU in calls of whole view pairs, about CPU_TILES_PER_CALL tiles each (more per call measured slower), the
    last call padded to the same size: every call has the same shape, so a photo's features do not depend on what
    else was encoded with it (GEMM kernels may round differently for other batch sizes). Elsewhere in one call."""
    n2, t = x.shape[:2]
    per_call = max(1, CPU_TILES_PER_CALL // (2 * t)) * 2 * t if rt.device.type == "cpu" else n2 * t
    tiles = x.flatten(0, 1)
    pad = -len(tiles) % per_call
    if pad:
        tiles = torch.cat([tiles, tiles.new_zeros((pad, *tiles.shape[1:]))])
    with rt.autocast():
        feats = torch.cat([model.encode(tiles[i:i + per_call].to(rt.device)).float()
                           for i in range(0, len(tiles), per_call)])
    return list(feats[:n2 * t].reshape(n2 // 2, 2, t, -1).cpu().numpy())  # (n, 2, T, D)


@dataclass(frozen=True)
class FeaturePlan:
    """Whether frozen-backbone epochs train on cached features, from which variants, and why (for the log)."""
    use: bool
    variants: tuple[str, ...] = ("id",)
    aug_key: str = ""
    message: str = ""


def plan_feature_path(cfg) -> FeaturePlan:
    """Decide the frozen-backbone path of a run (`RunConfig`).

    Cached: `--aug-prob 0` trains on the original photos (`id`); otherwise on a bank of `--feature-bank` K
    pre-augmented draws per photo, one chosen per epoch. Uncached (pixels every epoch): `--no-feature-cache`,
    pixel MixUp/CutMix (a mix of two photos has no cached features), or `--feature-bank 0` with augmentation on.
    """
    mode, a = cfg.train.mode, cfg.aug
    if mode == "single_stage":
        return FeaturePlan(False, message="feature cache: not used (the backbone trains from the first epoch)")
    scope = "stage 1" if mode == "two_stage" else "all epochs"
    if not cfg.cache.enabled:
        return FeaturePlan(False, message="feature cache: off (--no-feature-cache): the frozen backbone runs on "
                                          "pixels every epoch")
    if a.mixup_prob > 0 or a.cutmix_prob > 0:
        return FeaturePlan(False, message="feature cache: off: MixUp/CutMix mix the pixels of two photos, which "
                                          "cached features cannot represent; the frozen backbone runs on pixels")
    if a.augmenting and cfg.cache.bank == 0:
        return FeaturePlan(False, message="feature cache: off (--feature-bank 0 with augmentation on): fresh "
                                          "augmentation on pixels every epoch")
    if a.augmenting:
        key = {"aug_prob": a.aug_prob, "stereo_correct": a.stereo_correct_aug, "seed": cfg.seed}
        if a.scale_aug_prob > 0:  # (only then, so banks written before the option keep their key)
            key.update(scale_prob=a.scale_aug_prob, scale_range=list(a.scale_range), scale_pad=a.scale_pad)
        if a.light_aug_prob > 0:
            key.update(light_prob=a.light_aug_prob)
        extra = (f", --scale-aug-prob {a.scale_aug_prob} range {a.scale_range[0]:g}-{a.scale_range[1]:g} "
                 f"pad {a.scale_pad}" if a.scale_aug_prob > 0 else "")
        extra += f", --light-aug-prob {a.light_aug_prob}" if a.light_aug_prob > 0 else ""
        return FeaturePlan(True, bank_variants(cfg.cache.bank), json.dumps(key),
                           f"feature cache: on for {scope}: a bank of {cfg.cache.bank} pre-augmented variants per "
                           f"training photo (--aug-prob {a.aug_prob}, stereo-correct {a.stereo_correct_aug}{extra}), "
                           "one drawn per epoch; left/right swap applied on features; validation on the original "
                           "photos")
    return FeaturePlan(True, ("id",), "", f"feature cache: on for {scope}: original photos (--aug-prob 0); "
                                          "left/right swap applied on features")
