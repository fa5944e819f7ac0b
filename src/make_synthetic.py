"""Write a synthetic data set in the competition's layout (train.csv, test.csv, train/, test/, trainfold.csv).

    python -m src.make_synthetic --out data/synthetic
    python -m src.make_synthetic --out /tmp/tiny --n-train 24 --n-test 4 --size 224x112 --seed 1
    python -m src.make_synthetic --out data/synthetic --overwrite --preview docs/synthetic_examples.png

The set is written into a temporary folder beside --out and moved into place at the end, so a failed or
interrupted run leaves nothing half-written; a folder that already holds a train.csv is refused unless
--overwrite is given.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from src.synthetic import NUM_FOLDS, generate

OUTPUTS = ("train.csv", "test.csv", "trainfold.csv", "train", "test")


def parse_size(text: str) -> tuple[int, int]:
    """`WxH` -> (W, H); W must be even (two equal stereo halves) and the photo at least 16x8."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 2000x1000, got {text!r}") from None
    if w < 16 or h < 8 or w % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: need an even width >= 16 and a height >= 8")
    return w, h


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(prog="python -m src.make_synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write the data set into (created)")
    p.add_argument("--n-train", type=_count(NUM_FOLDS), default=357, help="training images (default 357)")
    p.add_argument("--n-test", type=_count(0), default=20, help="test images (default 20)")
    p.add_argument("--size", type=parse_size, default=(2000, 1000), help="photo WxH, two stereo halves (2000x1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--workers", type=_count(1), default=None, help="drawing processes (default: up to 4 CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    p.add_argument("--preview", metavar="PNG", help="also save a figure of six photos with their targets")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def write_atomically(out: Path, overwrite: bool, **kwargs) -> None:
    """generate() into a temporary folder beside `out`, then move the results into `out`."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} exists and is not a folder")
    if (out / "train.csv").exists() and not overwrite:
        raise SystemExit(f"--out {out} already holds a data set (train.csv); pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        generate(tmp, **kwargs)
        if not out.exists():
            tmp.rename(out)
            return
        for name in OUTPUTS:  # `out` may hold other files of the user's: replace only what we write
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            (tmp / name).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wide(base: Path) -> pd.DataFrame:
    """train.csv as one row per image with the targets as columns."""
    long = pd.read_csv(base / "train.csv")
    meta = long.drop_duplicates("image_path").set_index("image_path")
    wide = long.pivot(index="image_path", columns="target_name", values="target")
    return wide.join(meta[["Height_Ave_cm", "Sampling_Date", "State"]]).reset_index()


def plot_examples(base, out_png, n: int = 6) -> Path:
    """Save a figure of n training photos from low to high Green (plus the most Dead / Clover), titled with targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    base, df = Path(base), _wide(Path(base))
    by_green = df.sort_values("Dry_Green_g").index
    quantiles = [by_green[int(round(q * (len(df) - 1)))] for q in np.linspace(0, 1, max(1, n - 2))]
    picks = list(dict.fromkeys([*quantiles, df.Dry_Dead_g.idxmax(), df.Dry_Clover_g.idxmax(), *by_green]))[:n]
    rows = df.loc[picks].sort_values("Dry_Green_g")
    ncol = 2
    fig, axes = plt.subplots((len(rows) + ncol - 1) // ncol, ncol, figsize=(14, 3.7 * ((len(rows) + 1) // ncol) + 0.5))
    for ax, (_, r) in zip(np.ravel(axes), rows.iterrows(), strict=False):
        with Image.open(base / r.image_path) as im:
            im.thumbnail((800, 800), Image.Resampling.LANCZOS)  # a smaller, smoother figure file
            ax.imshow(im)
        ax.set_title(f"Green {r.Dry_Green_g:.1f}  Dead {r.Dry_Dead_g:.1f}  Clover {r.Dry_Clover_g:.1f}  "
                     f"Total {r.Dry_Total_g:.1f} g  |  height {r.Height_Ave_cm:.1f} cm  ({r.State})", fontsize=9)
    for ax in np.ravel(axes):
        ax.axis("off")
    fig.suptitle("Synthetic pasture photos (left and right stereo views), sorted by green biomass")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=60)
    plt.close(fig)
    return out_png


def summary(base: Path, seconds: float) -> str:
    """Lines describing what was written."""
    df = _wide(base)
    n_test = len(pd.read_csv(base / "test.csv")) // 5
    months = sorted({int(d.split("/")[1]) for d in df.Sampling_Date})
    means = ", ".join(f"{t} {df[t].mean():.1f}" for t in ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "Dry_Total_g"))
    return (f"wrote {len(df)} training and {n_test} test photos to {base} in {seconds:.1f} s\n"
            f"  States: {df.State.value_counts().sort_index().to_dict()}\n"
            f"  dates: {df.Sampling_Date.nunique()}, months: {months}\n  target means (g): {means}")


def main(argv: list[str] | None = None) -> int:
    """Parse the options, write the data set (and the preview), print a summary."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        def progress(total):
            return tqdm(total=total, unit="photo", desc="drawing", file=sys.stderr)

    start = time.perf_counter()
    write_atomically(out, args.overwrite, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed,
                     workers=args.workers, progress=progress)
    print(summary(out, time.perf_counter() - start))
    if args.preview:
        print(f"preview: {plot_examples(out, args.preview)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
