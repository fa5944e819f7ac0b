"""Predict new photos with a finished run: every image by the average of all fold models, in grams, with the
run's post-processing (and --derive-dead on top when asked).

Kaggle submission for DATA/test.csv (written to RUN/submission.csv unless --out is given):
    python -m src.predict --model-dir ./outputs/5head_20251214_123456 --data-dir data --tta --derive-dead
A folder of photos without any CSV (written to RUN/photo_predictions.csv: image, then the five targets):
    python -m src.predict --model-dir ./outputs/5head_20251214_123456 --images ./my_photos --device cpu

Photos need no metadata. Models are built without pretrained weights (everything comes from the checkpoints),
so this runs offline. Options left out take the run's value (--data-dir: the run's --base-path). The output is
written atomically once every photo is predicted; any error (no checkpoints, a bad test.csv, an unreadable
photo, an empty folder) exits with code 2, a one-line message and no output file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .cli import run_or_exit_code, setup_logging
from .constants import TARGETS
from .data import load_test
from .fileio import write_csv
from .inference import RunError, add_cache_arguments, open_run, predict_ensemble, resolve_options, runtime

logger = logging.getLogger("src.predict")

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.splitlines()[0])
    g = p.add_argument_group("Paths")
    g.add_argument("--model-dir", required=True, help="run folder with 5head_best_fold{k}.pth (and config.json)")
    g.add_argument("--data-dir", default=None, help="folder with test.csv and its photos (default: the run's "
                   "--base-path, else ./data)")
    g.add_argument("--images", default=None, metavar="DIR", help="predict every .jpg/.jpeg/.png in DIR instead of "
                   "test.csv")
    g.add_argument("--out", default=None, metavar="FILE", help="output CSV (default: RUN/submission.csv, or "
                   "RUN/photo_predictions.csv with --images)")
    g = p.add_argument_group("Inference")
    g.add_argument("--tta", action="store_true", help="average original, horizontal and vertical flips (in grams)")
    g.add_argument("--derive-dead", action="store_true", help="Dead = max(0, Total - GDM) after the run's "
                   "post-processing")
    g.add_argument("--device", default=None, choices=("cuda", "mps", "cpu"), help="default: auto-detect")
    add_cache_arguments(g)
    g.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's value)")
    g.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: the run's value)")
    return p


def list_photos(folder: str | Path) -> pd.DataFrame:
    """One row per photo of `folder` (file name `image`, `abs_path`), sorted by name; none is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"--images {folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise RunError(f"--images {folder} holds no photos ({', '.join(PHOTO_SUFFIXES)})")
    return pd.DataFrame({"image": [p.name for p in paths], "abs_path": [str(p.resolve()) for p in paths]})


def submission(rows: pd.DataFrame, images: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    """`sample_id,target` for every row of test.csv, in its order: the prediction of the row's image and target."""
    image_row = pd.Series(np.arange(len(images)), index=images["sample_id_prefix"]).loc[rows["sample_id_prefix"]]
    target_col = rows["target_name"].map({t: k for k, t in enumerate(TARGETS)})
    values = pred[image_row.to_numpy(), target_col.to_numpy()]
    return pd.DataFrame({"sample_id": rows["sample_id"].to_numpy(), "target": values})


def run_predict(args: argparse.Namespace) -> Path:
    """Predict test.csv (or --images); writes the CSV and returns its path."""
    run = open_run(args.model_dir)
    opts = resolve_options(run, vars(args))
    if args.images:
        images, rows = list_photos(args.images), None
        out = Path(args.out) if args.out else run.path / "photo_predictions.csv"
    else:
        images, rows = load_test(opts.data_dir)
        out = Path(args.out) if args.out else run.path / "submission.csv"
    device, autocast, precision = runtime(opts)
    logger.info("predicting %d photo(s) with the average of folds %s, device %s, %s, TTA %s", len(images),
                list(run.checkpoints), device, precision, "on" if opts.tta else "off")
    pred = predict_ensemble(run, images, opts, device, autocast)
    if not np.isfinite(pred).all() or (pred < 0).any():
        raise RunError("predictions are not all finite and non-negative: the checkpoints may be damaged")
    if rows is None:
        table = pd.concat([images[["image"]], pd.DataFrame(pred, columns=list(TARGETS))], axis=1)
    else:
        table = submission(rows, images, pred)
    write_csv(out, table)
    logger.info("wrote %s (%d rows)", out, len(table))
    return out


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    # RunError, DataError, ImageReadError and missing files are user errors
    return run_or_exit_code(lambda: run_predict(args), logger)


if __name__ == "__main__":
    sys.exit(main())
