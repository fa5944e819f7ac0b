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

from biomass5head.cli.common import add_inference_arguments, prog, run_command

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("python -m src.predict"), description=__doc__.splitlines()[0])
    paths, _ = add_inference_arguments(p, model_dir_help="run folder with 5head_best_fold{k}.pth (and config.json)",
                                       data_dir_help="folder with test.csv and its photos")
    paths.add_argument("--images", default=None, metavar="DIR", help="predict every .jpg/.jpeg/.png in DIR instead of "
                       "test.csv")
    paths.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                       help="with --images, also read its subfolders (the output names photos by relative path)")
    paths.add_argument("--out", default=None, metavar="FILE", help="output CSV (default: RUN/submission.csv, or "
                       "RUN/photo_predictions.csv with --images)")
    return p


def predict_command(args: argparse.Namespace):
    from biomass5head.infer.submission import run_predict  # here, so that --help answers without loading torch

    return run_predict(args.model_dir, vars(args), args.images, args.out)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, predict_command, logger)
