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
    return p


def check(base: Path) -> int:
    """Validate BASE/train.csv (and BASE/test.csv when present) and print a summary; 1 when anything is wrong."""
    errors = []
    try:
        print(summarize_train(load_train(base)))
    except DataError as e:
        errors.append(str(e))
    if (base / "test.csv").exists():
        try:
            images, rows = load_test(base)
            print(f"test.csv: {len(images)} images, {len(rows)} rows")
        except DataError as e:
            errors.append(str(e))
    for message in errors:
        print(message, file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, lambda args: check(Path(args.base_path)), logger)
