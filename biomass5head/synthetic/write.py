"""Writing a synthetic data set to disk: atomically into its folder, with a summary and a preview figure.

`synthetic.generate` draws the records and photos; this module makes sure a failed or interrupted run leaves
nothing half-written and an existing data set is replaced only when asked. The command is `cli/synthetic.py`.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from biomass5head.synthetic.generate import generate

OUTPUTS = ("train.csv", "test.csv", "trainfold.csv", "train", "test")


def write_atomically(out: Path, overwrite: bool, **kwargs) -> None:
    """generate() into a temporary folder beside `out`, then move the results into `out`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if (out / "train.csv").exists() and not overwrite:
        raise ValueError(f"--out {out} already holds a data set (train.csv); pass --overwrite to replace it")
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
