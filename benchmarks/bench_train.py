"""Training throughput on this machine: frozen backbone with and without the feature cache, the one-off cache
build, and full fine-tuning; samples/s and peak memory per mode (each mode in its own process).

    python benchmarks/bench_train.py                       # small CPU setting: ViT-S/14, 224 px, grid 2x2
    python benchmarks/bench_train.py --preset reference    # reference defaults: ViT-B/14-reg4, 518 px, batch 8

A few batches are timed and extrapolated to one epoch over 357 photos. Random backbone weights: speed does not
depend on them. Photos are synthetic 2000x1000 JPEGs, so decoding costs what it costs on real data.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "small": dict(backbone="vit_small_patch14_dinov2.lvd142m", img_size=224, grid=(2, 2), batch_size=8, photos=32),
    "reference": dict(backbone="vit_base_patch14_reg4_dinov2.lvd142m", img_size=518, grid=(2, 2), batch_size=8,
                      photos=8),
}
MODES = ("frozen_uncached", "cache_build", "frozen_cached", "full_finetune")
EPOCH_PHOTOS = 357


def run_mode(mode: str, preset: dict, data: Path, cache_dir: Path) -> dict:
    """Time one mode in this process; returns samples/s, seconds and peak RSS."""
    import torch

    from src.data import load_train
    from src.dataset import BiomassDataset, FeatureDataset, make_loader
    from src.engine import train_one_epoch
    from src.feature_cache import FeatureCache, autocast_key, ensure_features, state_dict_digest
    from src.losses import BiomassLoss
    from src.model import FiveHeadModel, create_backbone
    from src.targets import TargetTransform
    from src.trainer import Stage, build_optimizer

    torch.manual_seed(0)
    df = load_train(data)
    model = FiveHeadModel(create_backbone(preset["backbone"], preset["img_size"], pretrained=False))
    model.set_backbone_trainable(mode == "full_finetune")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    mean, std = model.mean_std
    grid, size, bs = preset["grid"], preset["img_size"], preset["batch_size"]
    cache = FeatureCache(cache_dir, backbone=preset["backbone"], weights_digest=state_dict_digest(model.backbone),
                         img_size=size, grid=grid, compute_dtype=autocast_key(autocast))
    kw = dict(grid=grid, img_size=size, mean=mean, std=std, device=torch.device("cpu"), autocast=autocast,
              batch_size=bs)
    start = time.perf_counter()
    if mode == "cache_build":
        ensure_features(cache, model, df["abs_path"], ["id"], **kw)
        seconds = time.perf_counter() - start
        return {"photos_per_s": len(df) / seconds, "seconds": seconds, "peak_rss_gb": _peak_gb()}
    if mode == "frozen_cached":
        table = ensure_features(cache, model, df["abs_path"], ["id"], **kw)  # built by the cache_build mode
        dataset = FeatureDataset(df, table, ["id"])
    else:
        dataset = BiomassDataset(df, grid, size, mean, std)
    loader = make_loader(dataset, batch_size=bs, shuffle=True, num_workers=0, prefetch_factor=1, seed=0)
    transform = TargetTransform.fit(df[["Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g"]]
                                    .to_numpy(), log_target=True)
    stage = Stage(mode, 1, mode == "full_finetune", 1e-3, 1e-5)
    optimizer = build_optimizer(model, stage, 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if mode == "frozen_cached":  # one warm-up epoch: the first batches pay one-off costs
        train_one_epoch(model, loader, BiomassLoss(transform), optimizer, scheduler, torch.device("cpu"), autocast)
    result = train_one_epoch(model, loader, BiomassLoss(transform), optimizer, scheduler, torch.device("cpu"),
                             autocast, log_every=0, desc=mode)
    return {"samples_per_s": result["samples_per_s"], "seconds": result["seconds"], "peak_rss_gb": _peak_gb()}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="small")
    p.add_argument("--photos", type=int, default=None, help="photos to time (default: the preset's)")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.mode:  # child process: one mode
        print(json.dumps(run_mode(args.mode, preset, Path(args.data), Path(args.cache))))
        return
    n = args.photos or preset["photos"]
    with tempfile.TemporaryDirectory() as tmp:
        from src.synthetic import generate

        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        generate(data, n_train=max(n, 5), n_test=0, seed=0)
        print(f"preset {args.preset}: {preset['backbone']}, img-size {preset['img_size']}, grid "
              f"{preset['grid'][0]}x{preset['grid'][1]}, batch {preset['batch_size']}, bfloat16 autocast, "
              f"{max(n, 5)} photos timed, extrapolated to {EPOCH_PHOTOS}")
        results = {}
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--mode", mode, "--data",
                                  str(data), "--cache", str(cache)], capture_output=True, text=True)
            if out.returncode != 0:  # e.g. killed by the kernel when the mode needs more RAM than the machine has
                reason = "killed (out of memory?)" if out.returncode < 0 else out.stderr.strip().splitlines()[-1]
                print(f"{mode:16s} failed: {reason}")
                continue
            results[mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
            rate = r.get("samples_per_s") or r["photos_per_s"]
            unit = "photos/s" if mode == "cache_build" else "samples/s"
            print(f"{mode:16s} {rate:9.2f} {unit:9s}  epoch of {EPOCH_PHOTOS}: {EPOCH_PHOTOS / rate:8.1f} s  "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB")
        if not {"frozen_cached", "frozen_uncached", "cache_build"} <= set(results):
            return
        speedup = results["frozen_cached"]["samples_per_s"] / results["frozen_uncached"]["samples_per_s"]
        print(f"cached frozen epoch is {speedup:.0f}x faster than an uncached one; the cache costs one pass "
              f"({EPOCH_PHOTOS / results['cache_build']['photos_per_s']:.0f} s) per variant")


if __name__ == "__main__":
    main()
