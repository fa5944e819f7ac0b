"""Predicting new photos with a finished run: every image by the average of all fold models, written as a Kaggle
submission (`sample_id,target` for test.csv) or, for a folder of photos, one row per photo.
The command is `cli/predict.py` (`python -m src.predict`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from biomass5head.constants import TARGETS
from biomass5head.data.tables import load_test
from biomass5head.fileio import write_csv
from biomass5head.infer.fold_model import predict_ensemble
from biomass5head.infer.run_folder import RunError, check_run_photos, open_run, resolve_options, runtime

logger = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def list_photos(folder: str | Path, recursive: bool = True) -> pd.DataFrame:
    """One row per photo in `folder` (and its subfolders when `recursive`): `image` (the path relative to the
    folder) and `abs_path`, sorted by `image`. Files skipped by their suffix are logged; no photo is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"--images {folder} is not a folder")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    paths = [p for p in files if p.suffix.lower() in PHOTO_SUFFIXES]
    skipped = [p for p in files if p.suffix.lower() not in PHOTO_SUFFIXES and not p.name.startswith(".")]
    if skipped:
        names = ", ".join(str(p.relative_to(folder)) for p in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        logger.warning("--images %s: skipped %d file(s) that are not photos (by suffix; photos are %s): %s", folder,
                       len(skipped), " ".join(PHOTO_SUFFIXES), names)
    if not recursive and any(p.is_dir() for p in folder.iterdir()):
        logger.info("--images %s: subfolders not read (--no-recursive)", folder)
    if not paths:
        raise RunError(f"--images {folder} holds no photos ({', '.join(PHOTO_SUFFIXES)})")
    return pd.DataFrame({"image": [p.relative_to(folder).as_posix() for p in paths],
                         "abs_path": [str(p.resolve()) for p in paths]})


def submission(rows: pd.DataFrame, images: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    """`sample_id,target` for every row of test.csv, in its order: the prediction of the row's image and target."""
    image_row = pd.Series(np.arange(len(images)), index=images["sample_id_prefix"]).loc[rows["sample_id_prefix"]]
    target_col = rows["target_name"].map({t: k for k, t in enumerate(TARGETS)})
    values = pred[image_row.to_numpy(), target_col.to_numpy()]
    return pd.DataFrame({"sample_id": rows["sample_id"].to_numpy(), "target": values})


def run_predict(model_dir: str | Path, given: dict, images_dir: str | None = None, out: str | None = None) -> Path:
    """Predict test.csv of the data folder (or every photo of `images_dir`) with the command line's options
    (`given`, None = the run's value); writes the CSV (`out`, else a default in the run folder), returns its path."""
    run = open_run(model_dir)
    opts = resolve_options(run, given)
    if images_dir:
        images, rows = list_photos(images_dir, recursive=given.get("recursive", True)), None
        check_run_photos(opts, images["abs_path"], f"photos in {images_dir}", any_aspect=True)
        out = Path(out) if out else run.path / "photo_predictions.csv"
    else:
        images, rows = load_test(opts.data_dir)
        check_run_photos(opts, images["abs_path"], "test photos")
        out = Path(out) if out else run.path / "submission.csv"
    rt = runtime(opts)
    logger.info("predicting %d photo(s) with the average of folds %s, device %s, %s, TTA %s", len(images),
                list(run.checkpoints), rt.device, rt.dtype_name, "on" if opts.tta else "off")
    pred = predict_ensemble(run, images, opts, rt)
    if not np.isfinite(pred).all() or (pred < 0).any():
        raise RunError("predictions are not all finite and non-negative: the checkpoints may be damaged")
    if rows is None:
        table = pd.concat([images[["image"]], pd.DataFrame(pred, columns=list(TARGETS))], axis=1)
    else:
        table = submission(rows, images, pred)
    write_csv(out, table)
    logger.info("wrote %s (%d rows)", out, len(table))
    return out
