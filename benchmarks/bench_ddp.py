"""torchrun on this machine: the same training in one process and in N processes (gloo on a CPU, NCCL on GPUs), and
the two ways N ranks can run epochs on cached features: sharded by DistributedDataParallel, or replicated (every
rank the whole epoch, no communication: what the trainer does).

    python benchmarks/bench_ddp.py                                   # 2 processes on the CPU, full fine-tuning
    python benchmarks/bench_ddp.py --nproc 4 --device-type cuda --img-size 224 --batch-size 8

Part 1 runs `python -m src.train_5head` once in one process (batch B x N) and once under `torchrun --standalone
--nproc-per-node N` (batch B per rank: the same global batch), two epochs of fold 0 on synthetic photos, and prints
the wall time of each command and the seconds of the second epoch from log_fold0.csv. On a CPU the N processes share
the cores (torchrun gives each one thread per core share), so this measures overhead, not a speed-up.
Part 2 times head-only epochs over random (2, T, D) features of 357 photos, global batch 16, in both modes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _env(threads: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def part_training(args, data: Path, tmp: Path) -> None:
    import pandas as pd

    from biomass5head.device import cpu_info

    cores = cpu_info().cores
    common = ["-m", "src.train_5head", "--base-path", str(data), "--backbone", args.backbone, "--no-pretrained",
              "--img-size", str(args.img_size), "--epochs", "2", "--train-folds", "0", "--num-workers", "0",
              "--device-type", args.device_type, "--amp-dtype", "float32", "--aug-prob", "0", "--warmup-epochs", "0"]
    runs = {"1 process": ([sys.executable, *common, "--batch-size", str(args.batch_size * args.nproc)], None),
            f"torchrun {args.nproc}": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node", str(args.nproc), *common, "--batch-size",
                                        str(args.batch_size)], max(1, cores // args.nproc))}
    print(f"part 1: full fine-tuning, {args.backbone} at {args.img_size} px, 2 epochs of fold 0, global batch "
          f"{args.batch_size * args.nproc}, {cores} usable cores")
    for name, (argv, threads) in runs.items():
        out = tmp / name.replace(" ", "_")
        start = time.perf_counter()
        proc = subprocess.run([*argv, "--output-dir", str(out)], cwd=ROOT, env=_env(threads), capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"{name:12s} failed: {proc.stdout[-800:]}{proc.stderr[-800:]}")
            continue
        log = pd.read_csv(out / "log_fold0.csv")
        print(f"{name:12s} command {wall:6.1f} s; epoch 2: {log['seconds'].iloc[-1]:6.2f} s "
              f"({log['samples_per_s'].iloc[-1]:.1f} samples/s); train loss {log['train_total'].round(5).tolist()}",
              flush=True)


def cached_worker(args) -> None:
    """One rank of part 2 (run under torchrun, or alone): time `--epochs` head-only epochs in both modes."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from biomass5head.distributed import init_distributed
    from biomass5head.model.backbone import create_backbone
    from biomass5head.model.five_head import FiveHeadModel

    info = init_distributed("cpu")
    torch.manual_seed(0)
    n, t, d, batch = 357, 8, 384, 16
    feats, target = torch.randn(n, 2, t, d), torch.rand(n, 5)
    model = FiveHeadModel(create_backbone(args.backbone, 56, pretrained=False))
    model.set_backbone_trainable(False)

    class Heads(torch.nn.Module):  # the cached-feature forward, as a module DDP can wrap
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, lf, rf):
            return self.m.forward_features(lf, rf)["reg"]

    results = {}
    for mode in ("replicated", "sharded"):
        heads = Heads(model)
        if mode == "sharded" and info.enabled:
            heads = DistributedDataParallel(heads)
        opt = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=1e-3)
        per_rank = batch // info.world_size if mode == "sharded" else batch
        start = time.perf_counter()
        for epoch in range(args.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            if mode == "sharded":
                order = order[info.rank::info.world_size]
            for i in range(0, len(order), per_rank):
                idx = order[i:i + per_rank]
                loss = torch.nn.functional.mse_loss(heads(feats[idx, 0], feats[idx, 1]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        results[mode] = (time.perf_counter() - start) / args.epochs
    if info.enabled:
        dist.barrier()
    if info.is_main:
        print(json.dumps(results))


def part_cached(args) -> None:
    from biomass5head.device import cpu_info

    cores = cpu_info().cores
    print(f"part 2: head-only epochs on cached features (357 photos, 2 x 8 tiles x 384, global batch 16), "
          f"mean of {args.epochs} epochs")
    me = [str(Path(__file__).resolve()), "--worker", "cached", "--epochs", str(args.epochs), "--backbone",
          args.backbone]
    for name, argv, threads in (("1 process", [sys.executable, *me], None),
                                (f"torchrun {args.nproc}", [sys.executable, "-m", "torch.distributed.run",
                                                           "--standalone", "--nproc-per-node", str(args.nproc), *me],
                                 max(1, cores // args.nproc))):
        proc = subprocess.run(argv, cwd=ROOT, env=_env(threads), capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name:12s} failed: {proc.stderr[-800:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:12s} replicated {r['replicated'] * 1000:7.1f} ms/epoch   sharded (DDP) "
              f"{r['sharded'] * 1000:7.1f} ms/epoch", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device-type", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=4, help="per rank (the single process gets N x this)")
    p.add_argument("--photos", type=int, default=40)
    p.add_argument("--epochs", type=int, default=5, help="part 2: epochs timed per mode")
    p.add_argument("--parts", nargs="+", default=["training", "cached"], choices=("training", "cached"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "cached":
        return cached_worker(args)
    import torch

    from biomass5head.device import cpu_info

    print(f"torch {torch.__version__}; CPU: {cpu_info().describe()}; CUDA devices: {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        if "training" in args.parts:
            from biomass5head.synthetic.generate import generate

            data = Path(tmp) / "data"
            generate(data, n_train=args.photos, n_test=0, size=(448, 224), seed=0, workers=1)
            part_training(args, data, Path(tmp))
        if "cached" in args.parts:
            part_cached(args)


if __name__ == "__main__":
    main()
