"""The torch Dataset: one image row -> tiles of both views (normalised tensors), targets in grams, aux labels."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info
from tqdm.auto import tqdm

from biomass5head.constants import AUX_HEADS, IGNORE_INDEX, TARGETS
from biomass5head.data.images import TileSpec, load_views

logger = logging.getLogger(__name__)

# OpenCV's own thread pool does not survive fork() into DataLoader workers (deadlocks); torch parallelises already.
cv2.setNumThreads(0)

def targets_and_labels(df) -> tuple[np.ndarray, dict]:
    """Targets (N, 5) grams (zeros for a frame without them, e.g. test photos) and aux labels per head."""
    n = len(df)
    has_targets = all(t in df.columns for t in TARGETS)
    targets = df[list(TARGETS)].to_numpy(np.float32) if has_targets else np.zeros((n, len(TARGETS)), np.float32)
    labels = {head: (df[aux.column].to_numpy(np.int64) if aux.column in df.columns
                     else np.full(n, IGNORE_INDEX, np.int64)) for head, aux in AUX_HEADS.items()}
    return targets, labels


def build_image_cache(paths, tiles: TileSpec, desc: str = "caching images") -> dict:
    """Decode every photo once into its (left, right) uint8 views at the size the tiles need (--cache-images)."""
    cache = {}
    for path in tqdm(list(dict.fromkeys(paths)), desc=desc, unit="img"):
        cache[path] = load_views(path, tiles.grid, tiles.img_size)
    size_gb = sum(v[0].nbytes + v[1].nbytes for v in cache.values()) / 1e9
    logger.info("image cache: %d photos, %.2f GB in RAM", len(cache), size_gb)
    return cache


class BiomassDataset(Dataset):
    """Rows of a one-row-per-image DataFrame as model inputs.

    Each item: `left`, `right` (T, 3, S, S) float32 normalised tiles, `target` (5,) grams (zeros when the
    frame has no targets), `state`/`month`/`species` class indices (IGNORE_INDEX where unknown), `index`.
    Order of work: decode (or cache) -> constrained MixUp/CutMix -> stereo augmentation -> tiling -> tensors,
    so every augmentation sees uint8 pixels.
    """

    def __init__(self, df, tiles: TileSpec, augment=None, mixer=None, image_cache: dict | None = None):
        self.paths = df["abs_path"].tolist()
        self.tiles = tiles
        self.targets, self.labels = targets_and_labels(df)
        self.augment = augment
        self.mixer = mixer
        self.image_cache = image_cache
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int):
        """The raw (left, right) uint8 views of row i, from the RAM cache when there is one."""
        path = self.paths[i]
        if self.image_cache is not None and path in self.image_cache:
            return self.image_cache[path]
        return load_views(path, self.tiles.grid, self.tiles.img_size)

    def reseed(self, seed: int) -> None:
        """Make augmentation and mixing repeatable for this epoch and worker."""
        if self.augment is not None:
            self.augment.reseed(seed)
        if self.mixer is not None:
            self.mixer.reseed(seed + 7919)

    def __getitem__(self, i: int) -> dict:
        views = self.load(i)
        target = self.targets[i].copy()
        mixing = self.mixer is not None and self.mixer.enabled
        if mixing:
            views, target, info = self.mixer(i, views, target, lambda j: (self.load(j), self.targets[j]))
        left, right = views
        if self.augment is not None:
            left, right = self.augment(left, right)
        item = {
            "left": self.tiles.to_tensor(left),
            "right": self.tiles.to_tensor(right),
            "target": torch.as_tensor(np.asarray(target, np.float32)),
            "index": i,
        }
        if mixing:  # the two photos' own targets and the mix, for losses that need each side (interval heads)
            partner = self.targets[info["partner"]] if info["partner"] >= 0 else self.targets[i]
            item.update(mix_targets=torch.as_tensor(np.stack([self.targets[i], partner]).astype(np.float32)),
                        mix_lam=torch.tensor(info["lam"], dtype=torch.float32))
        for head, labels in self.labels.items():
            item[head] = int(labels[i])
        return item


def _worker_init(worker_id: int) -> None:
    # Workers are re-created every epoch (no persistent workers), so epoch and worker id give a fresh stream.
    info = get_worker_info()
    ds = info.dataset
    ds.reseed(int(ds.base_seed) + 1000 * int(ds.epoch) + worker_id + 1)


class ShardSampler(Sampler):
    """Evaluation under torchrun: rank r of N takes items r, r + N, r + 2N, ... in order, so every item is seen by
    exactly one rank (no padding, unlike DistributedSampler) and gathered predictions cover the set once."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: BiomassDataset, *, batch_size: int, shuffle: bool, num_workers: int, prefetch_factor: int,
                seed: int, pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader whose shuffling and augmentation are repeatable for a seed (call `set_epoch` per epoch).

    Shuffled loaders draw one permutation per (seed, epoch) with torch's DistributedSampler, in a single process
    too (as rank 0 of 1): rank r of N takes every N-th item of the same permutation, so N processes with batch B
    see per step exactly the items one process sees with batch N x B. Unshuffled loaders keep dataset order; with
    N > 1 each rank takes its share (`ShardSampler`). Augmentation is seeded per rank."""
    dataset.base_seed = seed + 1_000_003 * rank
    generator = torch.Generator()
    generator.manual_seed(seed)
    if shuffle:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
    kwargs = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, generator=generator,
                      pin_memory=pin_memory, drop_last=False, **kwargs)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the sampler and the dataset the epoch before iterating; without workers reseed here, with workers
    `_worker_init` does."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    ds = loader.dataset
    ds.epoch = epoch
    if loader.num_workers == 0:
        ds.reseed(int(ds.base_seed) + 1000 * epoch)


class FeatureDataset(Dataset):
    """Rows as cached tile features instead of pixels (frozen backbone).

    Each item: `left_feats`, `right_feats` (T, D) float32, `target`, aux labels and `index`, like
    BiomassDataset. `variants` are the cached variants to draw from, one uniformly per item and epoch
    (`["id"]` for no augmentation, a bank `aug0..augK-1` otherwise); `swap_prob` swaps the two views, which
    needs no extra features.
    """

    def __init__(self, df, table: dict, variants, swap_prob: float = 0.0):
        self.paths = df["abs_path"].astype(str).tolist()
        self.targets, self.labels = targets_and_labels(df)
        self.table, self.variants, self.swap_prob = table, list(variants), float(swap_prob)
        self.rng = np.random.default_rng(0)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __getitem__(self, i: int) -> dict:
        variant = self.variants[int(self.rng.integers(len(self.variants)))]
        feats = self.table[self.paths[i]][variant]  # (2, T, D)
        left, right = feats[0], feats[1]
        if self.swap_prob > 0 and self.rng.random() < self.swap_prob:
            left, right = right, left
        item = {"left_feats": torch.from_numpy(np.ascontiguousarray(left)),
                "right_feats": torch.from_numpy(np.ascontiguousarray(right)),
                "target": torch.tensor(self.targets[i]), "index": i}
        for head, labels in self.labels.items():
            item[head] = int(labels[i])
        return item
