"""Clean stops: SIGINT (Ctrl-C) and SIGTERM (what schedulers and `timeout` send) become a `Stopped` exception at the
point the program is at, so every `finally` and atomic write cleans up; a second signal exits at once.

`cli.common.run_command` installs the handlers for every command and turns `Stopped` into one logged line and exit
code 128 + signal (130 for SIGINT, 143 for SIGTERM). Training adds where it stopped and how to resume.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading


class Stopped(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error: `except Exception` must not catch it
    """The user or the scheduler asked the program to stop."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        self.signal_name = signal.Signals(self.signum).name
        super().__init__(message or f"stopped by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals():
    """While inside, SIGINT and SIGTERM raise `Stopped`; a second one exits the process at once (128 + signal)."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from the main thread
        yield
        return
    received: list[int] = []
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:  # a DataLoader worker forked from us: torch's worker loop exits quietly on this
            raise KeyboardInterrupt
        if received:
            os._exit(128 + signum)
        received.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
