"""Graceful stop: the first SIGTERM/SIGINT asks the loops to finish, a second exits at once."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


class StopSignal:
    """A flag the loops poll; set by a signal or by tests."""

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        self._event.set()

    def wait(self, seconds: float | None) -> bool:
        """Sleep up to `seconds` (None: until a stop), waking early when a stop is requested."""
        return self._event.wait(seconds)

    def install(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            log_in_handler(logging.WARNING, "second signal, exiting at once",
                           action="stop_forced", signal=name)
            os._exit(1)
        self.request()
        log_in_handler(logging.INFO, "stopping after the current batch",
                       action="stop_requested", signal=name)


def log_in_handler(level: int, message: str, **extra: object) -> None:
    """Log from a signal handler, after it has acted.

    The handler runs between two bytecodes of the main thread, possibly in the middle of a
    write to stderr; a second write then raises RuntimeError ("reentrant call"). Losing that
    one line is better than losing the stop request with it.
    """
    try:
        log.log(level, message, extra=extra)
    except RuntimeError:
        pass
