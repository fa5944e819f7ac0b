"""Write a synthetic data set in the competition's layout (train.csv, test.csv, train/, test/, trainfold.csv).

    python -m src.make_synthetic --out data/synthetic
    python -m src.make_synthetic --out /tmp/tiny --n-train 24 --n-test 4 --size 224x112 --seed 1
    python -m src.make_synthetic --out data/realistic_s1 --difficulty realistic --seed 1
    python -m src.make_synthetic --out data/synthetic --overwrite --preview docs/synthetic_examples.png

The set is written into a temporary folder beside --out and moved into place at the end, so a failed or
interrupted run leaves nothing half-written; a folder that already holds a train.csv is refused unless
--overwrite is given.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from biomass5head.cli.common import prog, run_command
from biomass5head.synthetic.generate import DIFFICULTIES, NUM_FOLDS
from biomass5head.synthetic.write import plot_examples, summary, write_atomically

logger = logging.getLogger(__name__)


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
    p = argparse.ArgumentParser(prog=prog("python -m src.make_synthetic"), description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write the data set into (created)")
    p.add_argument("--n-train", type=_count(NUM_FOLDS), default=357, help="training images (default 357)")
    p.add_argument("--n-test", type=_count(0), default=20, help="test images (default 20)")
    p.add_argument("--size", type=parse_size, default=(2000, 1000), help="photo WxH, two stereo halves (2000x1000)")
    p.add_argument("--difficulty", choices=DIFFICULTIES, default="easy",
                   help="easy: clean photos, exact labels; realistic: label noise, shadows, exposure, blur, camera "
                        "height, weeds, litter and bare patches (biomass5head/synthetic/realism.py)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--workers", type=_count(1), default=None, help="drawing processes (default: up to 4 CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    p.add_argument("--preview", metavar="PNG", help="also save a figure of six photos with their targets")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def make(args: argparse.Namespace) -> int:
    """Write the data set (and the preview) and print a summary."""
    out = Path(args.out)
    progress = None
    if not args.quiet:
        def progress(total):
            return tqdm(total=total, unit="photo", desc="drawing", file=sys.stderr)

    start = time.perf_counter()
    write_atomically(out, args.overwrite, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed,
                     difficulty=args.difficulty, workers=args.workers, progress=progress)
    print(summary(out, time.perf_counter() - start))
    if args.preview:
        print(f"preview: {plot_examples(out, args.preview)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, make, logger)
