"""Check a data folder (train.csv, test.csv and their photos) and print a summary or every problem.

Every problem of train.csv (and of test.csv when present) is listed with its file, line and value.

    python -m src.data /path/to/csiro-biomass        # or: biomass5head check /path/to/csiro-biomass

Exit code 0 when the folder is usable, 1 when it has problems (listed on stderr), 2 when it cannot be read at all.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from biomass5head.cli.common import prog, run_command
from biomass5head.data.tables import DataError, load_test, load_train, summarize_train

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("python -m src.data"), description=__doc__.splitlines()[0])
    p.add_argument("base_path", help="data folder holding train.csv, train/ (and optionally test.csv, test/)")
    p.add_argument("--check-photos", default="header", choices=("header", "full"),
                   help="read every photo's header (size, mode; default), or decode it in full (finds truncation)")
    p.add_argument("--allow-any-aspect", action="store_true", help="photos that are not 2:1 are a warning")
    p.add_argument("--strict", action="store_true", help="implausible targets are an error, not a warning")
    return p


def check(args: argparse.Namespace) -> int:
    """Validate BASE/train.csv and BASE/test.csv (when present) and their photos, print a summary; 1 when anything
    is wrong."""
    from biomass5head.data.photo_check import PhotoError, check_photos

    base = Path(args.base_path)
    errors = []
    def test_images():
        images, rows = load_test(base)
        return images, f"test.csv: {len(images)} images, {len(rows)} rows"

    def train_images():
        train = load_train(base, strict=args.strict)
        return train, summarize_train(train)

    parts = [(train_images, "training photos")] + [(test_images, "test photos")] * (base / "test.csv").exists()
    for load, what in parts:
        try:
            table, summary = load()
        except DataError as e:
            errors.append(str(e))
            continue
        print(summary)
        try:
            reports = check_photos(table["abs_path"], level=args.check_photos,
                                   allow_any_aspect=args.allow_any_aspect, what=what)
            print(f"  {what}: {len(reports)} checked ({args.check_photos}), all usable")
        except PhotoError as e:
            errors.append(str(e))
    for message in errors:
        print(message, file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, check, logger)
