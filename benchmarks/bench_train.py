"""Training throughput on this machine, float32 and bfloat16 side by side: the sustained GEMM rate, the one-off
feature-cache build (tiles/s, achieved FLOP/s and its ratio to the GEMM rate), frozen training with and without
the cache, and full fine-tuning; samples/s and peak memory per mode (each mode in its own process).

    python benchmarks/bench_train.py                       # small CPU setting: ViT-S/14, 224 px, grid 2x2
    python benchmarks/bench_train.py --img-size 112        # the demo's setting
    python benchmarks/bench_train.py --preset reference    # reference defaults: ViT-B/14-reg4, 518 px, batch 8
    python benchmarks/bench_train.py --dtypes float32 --modes cache_build

On a machine with CUDA it then measures full fine-tuning on the GPU at the reference defaults (ViT-B/14 reg4, 518 px,
grid 2x2, batch 8, bfloat16 autocast, fused AdamW, 4 DataLoader workers with pinned memory): samples/s, peak GPU
memory, model FLOPs utilisation (the forward+backward FLOPs of a step, counted by torch's FlopCounterMode, per second,
over the GPU's dense bfloat16 peak) and the share of step time spent waiting for data (`--gpu-only` skips the CPU
part, `--compile` adds torch.compile). Without CUDA it says so and the CPU numbers stand.

It also prints which precision `--amp-dtype` (default float16) resolves to here, and why. Emulated bfloat16 on a
CPU without native support is 6-12x slower: its modes time fewer photos (`--slow-photos`). To see what an AVX2-only
CPU does on a newer one, run with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2.

A few batches are timed and extrapolated to one epoch over 357 photos. Random backbone weights: speed does not
depend on them. Photos are synthetic 2000x1000 JPEGs, so decoding costs what it costs on real data.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "small": dict(backbone="vit_small_patch14_dinov2.lvd142m", img_size=224, grid=(2, 2), batch_size=8, photos=16),
    "reference": dict(backbone="vit_base_patch14_reg4_dinov2.lvd142m", img_size=518, grid=(2, 2), batch_size=8,
                      photos=8),
}
MODES = ("cache_build", "frozen_cached", "frozen_uncached", "full_finetune")
DTYPES = ("float32", "bfloat16")
EPOCH_PHOTOS = 357


def gemm_rate(dtype_name: str, max_n: int = 4096, seconds: float = 3.0) -> tuple[float, int]:
    """Sustained GFLOP/s of a large square torch.mm in `dtype_name`, and its size: 4096, or smaller where one call
    would take over a second (emulated bfloat16 runs at well under 1 GFLOP/s)."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 512
    while n < max_n:
        a = torch.randn(n, n).to(dtype)
        start = time.perf_counter()
        torch.mm(a, a)
        if (time.perf_counter() - start) * 8 > 1.0:  # the next size costs 8x
            break
        n *= 2
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 2:
        torch.mm(a, b)
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - start) / 1e9, n


def flops_per_tile(model, size: int) -> float:
    """FLOPs of one tile through the backbone (matmuls and attention, as torch's FlopCounterMode counts them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.encode(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def run_mode(mode: str, dtype_name: str, preset: dict, data: Path, cache_dir: Path, photos: int) -> dict:
    """Time one mode in this process; returns rates, seconds and peak RSS."""
    import torch

    from biomass5head.data.datasets import BiomassDataset, FeatureDataset, make_loader
    from biomass5head.data.feature_cache import FeatureCache, ensure_features, state_dict_digest
    from biomass5head.data.images import TileSpec
    from biomass5head.data.tables import load_train
    from biomass5head.device import Precision, Runtime, configure_cpu_threads
    from biomass5head.model.backbone import create_backbone
    from biomass5head.model.five_head import FiveHeadModel
    from biomass5head.model.targets import TargetTransform
    from biomass5head.train.engine import train_one_epoch
    from biomass5head.train.losses import BiomassLoss
    from biomass5head.train.stages import Stage, build_optimizer

    configure_cpu_threads()
    torch.manual_seed(0)
    df = load_train(data).iloc[:photos]
    model = FiveHeadModel(create_backbone(preset["backbone"], preset["img_size"], pretrained=False))
    model.set_backbone_trainable(mode == "full_finetune")
    rt = Runtime(torch.device("cpu"), Precision(dtype_name, getattr(torch, dtype_name) if dtype_name != "float32"
                                                else None, "benchmark"), 0)
    grid, size, bs = preset["grid"], preset["img_size"], preset["batch_size"]
    tiles = TileSpec(tuple(grid), size, *model.mean_std)
    cache = FeatureCache(cache_dir, backbone=preset["backbone"], weights_digest=state_dict_digest(model.backbone),
                         tiles=tiles, compute_dtype=rt.dtype_name)
    kw = dict(tiles=tiles, runtime=rt, batch_size=bs)
    tiles_per_photo = 2 * grid[0] * grid[1]
    if mode == "cache_build":
        gemm, gemm_n = gemm_rate(dtype_name)
        flops = flops_per_tile(model, size)
        ensure_features(cache, model, df["abs_path"].iloc[:1], ["id"], **kw)  # warm-up: one-off allocations
        start = time.perf_counter()
        ensure_features(cache, model, df["abs_path"].iloc[1:], ["id"], **kw)
        seconds = time.perf_counter() - start
        tiles_s = (len(df) - 1) * tiles_per_photo / seconds
        return {"photos_per_s": tiles_s / tiles_per_photo, "tiles_per_s": tiles_s, "gemm_gflops": gemm,
                "gemm_n": gemm_n, "gflop_per_tile": flops / 1e9, "achieved_gflops": tiles_s * flops / 1e9,
                "ratio": tiles_s * flops / 1e9 / gemm, "seconds": seconds, "peak_rss_gb": _peak_gb()}
    if mode == "frozen_cached":
        table = ensure_features(cache, model, df["abs_path"], ["id"], **kw)  # built by the cache_build mode
        dataset = FeatureDataset(df, table, ["id"])
    else:
        dataset = BiomassDataset(df, tiles)
    loader = make_loader(dataset, batch_size=bs, shuffle=True, num_workers=0, prefetch_factor=1, seed=0)
    transform = TargetTransform.fit(df[["Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g"]]
                                    .to_numpy(), log_target=True)
    stage = Stage(mode, 1, mode == "full_finetune", 1e-3, 1e-5)
    optimizer = build_optimizer(model, stage, 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if mode == "frozen_cached":  # one warm-up epoch: the first batches pay one-off costs
        train_one_epoch(model, loader, BiomassLoss(transform), optimizer, scheduler, rt, log_every=0)
    result = train_one_epoch(model, loader, BiomassLoss(transform), optimizer, scheduler, rt, log_every=0, desc=mode)
    return {"samples_per_s": result["samples_per_s"], "seconds": result["seconds"], "peak_rss_gb": _peak_gb()}


# Dense bfloat16 peak TFLOP/s (no sparsity) by GPU name, from the vendors' data sheets (SXM parts where both exist).
GPU_BF16_PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
                        "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def gpu_peak_tflops(name: str) -> float | None:
    for key in sorted(GPU_BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return GPU_BF16_PEAK_TFLOPS[key]
    return None


def run_gpu(preset: dict, data: Path, steps: int, warmup: int, workers: int, compile_: bool,
            device_name: str = "cuda") -> dict:
    """Full fine-tuning on the first CUDA device as the trainer runs it; returns rates, MFU and data wait.
    (`device_name` "cpu" runs the same code without the GPU's numbers, to check it where there is no GPU.)"""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from biomass5head.data.datasets import BiomassDataset, make_loader, set_epoch
    from biomass5head.data.images import TileSpec
    from biomass5head.data.tables import load_train
    from biomass5head.device import Precision, Runtime
    from biomass5head.model.backbone import create_backbone
    from biomass5head.model.five_head import FiveHeadModel
    from biomass5head.model.predict import forward_batch
    from biomass5head.model.targets import TargetTransform
    from biomass5head.train.losses import BiomassLoss
    from biomass5head.train.stages import Stage, build_optimizer

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    df = load_train(data)
    model = FiveHeadModel(create_backbone(preset["backbone"], preset["img_size"], pretrained=False)).to(device)
    model.set_backbone_trainable(True)
    if compile_:
        model.compile_backbone()
    rt = Runtime(device, Precision("bfloat16", torch.bfloat16 if cuda else None, "benchmark"), workers)
    tiles = TileSpec(tuple(preset["grid"]), preset["img_size"], *model.mean_std)
    loader = make_loader(BiomassDataset(df, tiles), batch_size=preset["batch_size"], shuffle=True,
                         num_workers=workers, prefetch_factor=4, seed=0, pin_memory=cuda)
    transform = TargetTransform.fit(df[["Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g"]]
                                    .to_numpy(), log_target=True)
    loss_fn = BiomassLoss(transform)
    optimizer = build_optimizer(model, Stage("full", 1, True, 2e-4, 1e-5), 0.01)
    model.train()

    def step(batch):
        with rt.autocast():
            out = forward_batch(model, batch, device)
        loss, _ = loss_fn(out["reg"].float(), transform.encode(batch["target"].to(device)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def batches():
        epoch = 0
        while True:
            set_epoch(loader, epoch)
            yield from loader
            epoch += 1

    it = batches()
    for _ in range(warmup):
        step(next(it))
    with FlopCounterMode(display=False) as counter:  # one step's forward + backward FLOPs
        step(next(it))
    flops = float(counter.get_total_flops())
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        step(batch)
    sync()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = gpu_peak_tflops(name) if cuda else None
    achieved = flops * steps / seconds / 1e12
    return {"gpu": name, "samples_per_s": steps * preset["batch_size"] / seconds,
            "step_ms": 1000 * seconds / steps, "tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
            "peak_tflops": peak, "mfu": achieved / peak if peak else None, "data_wait_frac": wait / seconds,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else _peak_gb(), "compile": compile_,
            "workers": workers}


def gpu_line(r: dict) -> str:
    mfu = (f"MFU {100 * r['mfu']:.1f} % of {r['peak_tflops']:.0f} TFLOP/s bf16 dense" if r["mfu"] is not None
           else "MFU unknown (this GPU's peak is not in GPU_BF16_PEAK_TFLOPS)")
    return (f"{r['gpu']}{' (torch.compile)' if r['compile'] else ''}: {r['samples_per_s']:.1f} samples/s, "
            f"{r['step_ms']:.0f} ms/step, {r['tflop_per_step']:.2f} TFLOP per step -> {r['achieved_tflops']:.1f} "
            f"TFLOP/s; {mfu}; data wait {100 * r['data_wait_frac']:.1f} % of step time ({r['workers']} workers); "
            f"peak memory {r['peak_mem_gb']:.1f} GB")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def machine_line() -> str:
    """The CPU as torch uses it and what `--amp-dtype float16` (the default) resolves to here."""
    import torch

    from biomass5head.device import configure_cpu_threads, cpu_info, resolve_precision

    threads = configure_cpu_threads()
    p = resolve_precision("float16", torch.device("cpu"))
    return (f"torch {torch.__version__}; CPU: {cpu_info().describe()}; {threads} intra-op threads\n"
            f"default --amp-dtype float16 resolves here to: {p.name} ({p.reason})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="small")
    p.add_argument("--img-size", type=int, default=None, help="override the preset's --img-size")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch (photos per call)")
    p.add_argument("--photos", type=int, default=None, help="photos to time (default: the preset's)")
    p.add_argument("--slow-photos", type=int, default=4, help="photos to time for emulated bfloat16 (default 4)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--gpu-only", action="store_true", help="only the GPU measurement (reference preset by default)")
    p.add_argument("--gpu-steps", type=int, default=30, help="GPU steps timed (after 5 warm-up steps)")
    p.add_argument("--gpu-photos", type=int, default=64, help="photos generated for the GPU measurement")
    p.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    args = p.parse_args()
    if args.gpu_only:
        return gpu_main(args)
    preset = dict(PRESETS[args.preset])
    if args.img_size:
        preset["img_size"] = args.img_size
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    if args.mode:  # child process: one mode, one dtype
        print(json.dumps(run_mode(args.mode, args.dtype, preset, Path(args.data), Path(args.cache), args.photos)))
        return
    from biomass5head.device import cpu_info

    print(machine_line())
    n = max(args.photos or preset["photos"], 3)
    with tempfile.TemporaryDirectory() as tmp:
        from biomass5head.synthetic.generate import generate

        data = Path(tmp) / "data"
        generate(data, n_train=n, n_test=0, seed=0)
        print(f"preset {args.preset}: {preset['backbone']}, img-size {preset['img_size']}, grid "
              f"{preset['grid'][0]}x{preset['grid'][1]}, batch {preset['batch_size']}; rates extrapolated to "
              f"{EPOCH_PHOTOS} photos")
        results = {}
        for dtype in args.dtypes:
            emulated = dtype == "bfloat16" and not cpu_info().native_bf16
            photos = min(n, args.slow_photos) if emulated else n
            cache = Path(tmp) / f"cache_{dtype}"
            print(f"--- {dtype}{' (emulated: no native bfloat16 here)' if emulated else ''}, {photos} photos timed")
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--preset", args.preset, "--mode", mode, "--dtype", dtype,
                       "--data", str(data), "--cache", str(cache), "--photos", str(photos),
                       "--img-size", str(preset["img_size"]), "--batch-size", str(preset["batch_size"])]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if out.returncode != 0:  # e.g. killed by the kernel when the mode needs more RAM than there is
                    reason = "killed (out of memory?)" if out.returncode < 0 else out.stderr.strip().splitlines()[-1]
                    print(f"{mode:16s} failed: {reason}")
                    continue
                results[(dtype, mode)] = r = json.loads(out.stdout.strip().splitlines()[-1])
                rate = r.get("samples_per_s") or r["photos_per_s"]
                unit = "photos/s" if mode == "cache_build" else "samples/s"
                line = (f"{mode:16s} {rate:9.2f} {unit:9s}  epoch of {EPOCH_PHOTOS}: {EPOCH_PHOTOS / rate:8.1f} s  "
                        f"peak RSS {r['peak_rss_gb']:.2f} GB")
                if mode == "cache_build":
                    line += (f"\n{'':16s} {r['tiles_per_s']:9.2f} tiles/s; {r['gflop_per_tile']:.2f} GFLOP per tile "
                             f"-> {r['achieved_gflops']:.1f} GFLOP/s achieved; {dtype} GEMM ({r['gemm_n']}^3 torch.mm) "
                             f"{r['gemm_gflops']:.1f} GFLOP/s; ratio {100 * r['ratio']:.0f} %")
                print(line, flush=True)
        both = [results.get((d, "cache_build")) for d in DTYPES]
        if all(both):
            print(f"cache build, bfloat16 / float32 speed: {both[1]['tiles_per_s'] / both[0]['tiles_per_s']:.2f}x")
    gpu_main(args)


def gpu_main(args) -> None:
    """The GPU part: reference defaults (or the --preset given with --gpu-only) on the first CUDA device."""
    import torch

    if not torch.cuda.is_available():
        print("GPU: no CUDA device here: samples/s, MFU and data wait on a GPU were not measured; the CPU numbers "
              "above stand")
        return
    preset = dict(PRESETS["reference" if not args.gpu_only or args.preset == "small" else args.preset])
    if args.img_size:
        preset["img_size"] = args.img_size
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    print(f"GPU: full fine-tuning, {preset['backbone']} at {preset['img_size']} px, grid {preset['grid'][0]}x"
          f"{preset['grid'][1]}, batch {preset['batch_size']}, bfloat16 autocast, fused AdamW", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        from biomass5head.synthetic.generate import generate

        data = Path(tmp) / "data"
        generate(data, n_train=args.gpu_photos, n_test=0, seed=0)
        for compile_ in (False, True) if args.compile else (False,):
            r = run_gpu(preset, data, args.gpu_steps, 5, 4, compile_)
            print(gpu_line(r), flush=True)


if __name__ == "__main__":
    main()
