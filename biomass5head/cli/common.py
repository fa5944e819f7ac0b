"""What every entry point shares: one log format, one user-error wrapper, and the options eval and predict share.

Every command module in `cli/` has the same shape: `build_parser()` (tests call it), `main(argv) -> int` that
parses, then hands the work to `run_command`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from biomass5head.interrupt import Stopped, stop_on_signals

# What a user can cause and fix: a bad file, option or run folder (ValueError and its subclasses: ConfigError,
# DataError, FoldError, RunError, ImageReadError), a missing file or weights (OSError, WeightsUnavailable), a
# diverging loss (FloatingPointError); training turns a device out of memory into a ConfigError. One logged line and
# exit code 2; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)
RUN_VALUE = "default: the run's value"
_invoked_as: str | None = None  # "biomass5head eval" when the console script dispatched the command


def prog(spec_command: str) -> str:
    """A parser's program name: how the command was invoked (the spec's `python -m src.X` unless the `biomass5head`
    console script dispatched it)."""
    return _invoked_as or spec_command


def invoked_as(name: str | None) -> None:
    """Record that the console script runs `name` (None: back to the spec's names)."""
    global _invoked_as
    _invoked_as = name


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record arrives (a command run in-process, e.g. by a test, may run
    under a replaced stdout)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging() -> None:
    """INFO lines with a time stamp on stdout (beside tqdm's bars on stderr). Installed once; other handlers on the
    root logger (a host application's, pytest's) are left alone."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, work: Callable[[argparse.Namespace], object],
                logger: logging.Logger) -> int:
    """Every command's `main`: parse `argv`, set up logging and call `work(args)`; a user error becomes one logged
    line and exit code 2; SIGINT / SIGTERM one line and exit code 130 / 143 (`interrupt.py`). Returns `work`'s
    result when it is an exit code (an int), else 0."""
    args = parser.parse_args(argv)
    setup_logging()
    try:
        with stop_on_signals():
            code = work(args)
    except USER_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    except Stopped as stop:  # Ctrl-C or SIGTERM: no traceback, the conventional exit code
        logger.warning("%s", stop)
        return stop.exit_code
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def add_inference_arguments(p: argparse.ArgumentParser, *, model_dir_help: str, data_dir_help: str
                            ) -> tuple[argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """The options eval and predict share, in two groups returned for the command's own options: "Paths"
    (--model-dir, --data-dir) and "Inference" (--batch-size, --num-workers, --device, --feature-cache,
    --no-feature-cache, --tta, --derive-dead). Options left out (None) take the run's value."""
    paths = p.add_argument_group("Paths")
    paths.add_argument("--model-dir", required=True, help=model_dir_help)
    paths.add_argument("--data-dir", default=None,
                       help=f"{data_dir_help} (default: the run's --base-path, else ./data)")
    g = p.add_argument_group("Inference")
    g.add_argument("--batch-size", type=int, default=None, help=f"images per batch ({RUN_VALUE}, else 4)")
    g.add_argument("--num-workers", type=int, default=None, help=f"DataLoader workers ({RUN_VALUE}, else 4 on a GPU "
                   "and one per 4 cores on a CPU)")
    g.add_argument("--device", default=None, choices=("cuda", "mps", "cpu"), help="default: auto-detect")
    g.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="frozen-feature cache folder (default: the run's, else <data-dir>/.feature_cache)")
    g.add_argument("--no-feature-cache", action="store_true", help="predict from pixels even for a frozen run")
    g.add_argument("--check-photos", default=None, choices=("header", "full"),
                   help="read every photo's header first (default), or decode it in full")
    g.add_argument("--allow-any-aspect", action="store_true", help="accept photos that are not 2:1 stereo pairs "
                   "(split at the middle column, with a warning; default: the run's choice)")
    g.add_argument("--tta", action="store_true", help="average original, horizontal and vertical flips (in grams)")
    g.add_argument("--derive-dead", action="store_true",
                   help="Dead = max(0, Total - GDM) after the run's post-processing")
    return paths, g
