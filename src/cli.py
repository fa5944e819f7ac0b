"""What every entry point shares: one log format on stdout."""
from __future__ import annotations

import logging
import sys


def setup_logging(force: bool = False) -> None:
    """INFO lines with a time stamp on stdout (beside tqdm's bars on stderr). `force` replaces earlier handlers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=force)
