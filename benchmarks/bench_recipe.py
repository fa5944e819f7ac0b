"""The model-quality table: the 5-head model beside the ridge probe on the same frozen features and folds, for each
data set and recipe variant, with honest selection; prints one markdown row per run and the time it took.

    python benchmarks/bench_recipe.py --data data/realistic_s1 data/realistic_s2 data/synthetic --out outputs/bench
    python benchmarks/bench_recipe.py --data DIR --variants reference robust --epochs 30

Every run: frozen ViT-S/14 (the imported weights, weights/vit_small_patch14_dinov2.imgfocus.safetensors), 224 px,
grid 2x2, 5 folds by group_month, --select-on inner, then eval_5head_oof and report (the ridge probe
chooses its pooling, target space and alpha on the same inner splits). Feature caches go to DATA/.feature_cache and
are shared by the variants. Make the sets with `python -m src.make_synthetic --difficulty realistic --seed S`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

WEIGHTS = "weights/vit_small_patch14_dinov2.imgfocus.safetensors"
COMMON = ["--backbone", "vit_small_patch14_dinov2.lvd142m", "--backbone-weights", WEIGHTS, "--img-size", "224",
          "--grid", "2", "2", "--freeze-backbone", "--cv-strategy", "group_month",
          "--select-on", "inner", "--device-type", "cpu"]
# name -> extra options: "robust" is the recipe (--target-transform sqrt --ridge-base --refit --ridge-select cv,
# trained on the feature bank that the default --aug-prob 0.5 makes; --select-on inner is common to all), each
# "robust-no-..." leaves one of its changes out, "robust-holdout" chooses the ridge on the inner split alone,
# "robust-<option>" adds one, "reference" has none of them (the model-quality issue's settings, --aug-prob 0).
VARIANTS = {
    "reference": ["--use-log-target", "--aug-prob", "0"],
    "robust": ["--recipe", "robust"],
    "robust-no-aug": ["--recipe", "robust", "--aug-prob", "0"],
    "robust-bank8": ["--recipe", "robust", "--feature-bank", "8"],
    "robust-reconcile": ["--recipe", "robust", "--reconcile"],
    "robust-no-refit": ["--target-transform", "sqrt", "--ridge-base", "--ridge-select", "cv"],
    "robust-holdout": ["--recipe", "robust", "--ridge-select", "holdout"],
    "robust-no-ridge-base": ["--target-transform", "sqrt", "--refit"],
    "robust-log1p": ["--recipe", "robust", "--use-log-target"],
    "robust-scale": ["--recipe", "robust", "--scale-aug-prob", "0.5"],
    "robust-light": ["--recipe", "robust", "--light-aug-prob", "0.5"],
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed: {' '.join(cmd)} (see {log})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", required=True, help="data sets (folders with train.csv)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default="outputs/bench_recipe", help="folder for the runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    print("| data set | variant | 5-head OOF | ridge probe OOF | 5-head - ridge | seconds (train+eval+report) |")
    print("|---|---|---|---|---|---|")
    for data in args.data:
        for name in args.variants:
            run_dir = out / f"{Path(data).name}_{name}"
            if (run_dir / "ridge_oof_metrics.json").is_file():
                seconds = json.loads((run_dir / "bench_seconds.json").read_text())
            else:
                extra = VARIANTS[name]
                start = time.perf_counter()
                log = out / f"{run_dir.name}.log"
                run([py, "-m", "src.train_5head", "--base-path", data, "--output-dir", str(run_dir),
                     "--epochs", str(args.epochs), *COMMON, *extra], log)
                run([py, "-m", "src.eval_5head_oof", "--model-dir", str(run_dir), "--device", "cpu"], log)
                run([py, "-m", "src.report", "--model-dir", str(run_dir)], log)
                seconds = time.perf_counter() - start
                (run_dir / "bench_seconds.json").write_text(json.dumps(seconds))
            head = json.loads((run_dir / "oof_metrics.json").read_text())["weighted_r2"]
            ridge = json.loads((run_dir / "ridge_oof_metrics.json").read_text())["weighted_r2"]
            print(f"| {Path(data).name} | {name} | {head:.4f} | {ridge:.4f} | {head - ridge:+.4f} | {seconds:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
