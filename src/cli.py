"""What every entry point shares: one log format on stdout."""
from __future__ import annotations

import logging
import sys


def setup_logging(force: bool = False) -> None:
    """INFO lines with a time stamp on stdout (beside tqdm's bars on stderr). `force` replaces earlier handlers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=force)


def run_or_exit_code(work, logger: logging.Logger) -> int:
    """Call `work()`; a user error (bad file, option or run: ValueError / OSError and their subclasses) becomes one
    logged line and exit code 2 instead of a traceback. Returns 0 on success."""
    try:
        work()
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    return 0
