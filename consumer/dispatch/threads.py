"""The dispatcher's helper threads: the Twilio workers, and the listener of `smsq_due`.

Both post what they have to the loop's event queue; only the loop's thread touches the
scheduler and the database connections it owns.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg

from consumer import reconnect
from consumer.dispatch import claims
from consumer.dispatch.outcomes import TwilioAttempt
from consumer.dispatch.twilio_client import FoundMessage
from consumer.logs import error_text
from consumer.pipeline import DUE_CHANNEL, parse_due
from consumer.settings import Settings
from consumer.signals import StopSignal

log = logging.getLogger(__name__)


@dataclass
class SendResult:
    row: claims.ClaimedRow
    attempt: TwilioAttempt | None
    error: Exception | None
    seconds: float
    finished: datetime


@dataclass
class ReconcileResult:
    row: claims.ClaimedRow
    found: list[FoundMessage]
    error: Exception | None


class WorkerPool:
    """Daemon threads that run the Twilio calls and post each result to the loop.

    Daemon threads, unlike concurrent.futures', do not hold the process at exit: a request
    stuck until its read timeout must not stretch a SIGTERM past its grace period.
    """

    def __init__(self, size: int, results: queue.SimpleQueue) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.results = results
        for number in range(size):
            threading.Thread(target=self._work, name=f"twilio-{number}", daemon=True).start()

    def submit(self, call: Callable[..., object], *args: object) -> None:
        self.tasks.put((call, args))

    def _work(self) -> None:
        while True:
            call, args = self.tasks.get()
            self.results.put(("done", call(*args)))


class DueListener(threading.Thread):
    """LISTEN smsq_due on a connection of its own; posts ('due', sender, rank) events."""

    def __init__(self, settings: Settings, events: queue.SimpleQueue, stop: StopSignal) -> None:
        super().__init__(name="listen", daemon=True)
        self.dsn, self.events, self.stop = settings.database_dsn, events, stop

    def run(self) -> None:
        while not self.stop.requested:
            conn = self._connect()
            if conn is None:
                return
            try:
                self._listen(conn)
            except psycopg.OperationalError as exc:
                log.warning("listen connection lost", extra={"action": "postgres_lost",
                                                             "connection": "listen",
                                                             "error": error_text(exc)})
            finally:
                conn.close()

    def _connect(self) -> psycopg.Connection | None:
        """LISTENing, or None when stopped first; a new backoff for each outage."""
        conns: list[psycopg.Connection] = []

        def connect() -> None:
            conn = psycopg.connect(self.dsn, autocommit=True,
                                   application_name="smsq dispatch listen")
            conn.execute(f"LISTEN {DUE_CHANNEL}")
            conns.append(conn)
        connected = reconnect.until_connected("postgres", self.stop, psycopg.OperationalError,
                                              log, connect)
        return conns[-1] if connected and conns else None

    def _listen(self, conn: psycopg.Connection) -> None:
        self.events.put(("poll",))  # whatever was announced while nobody listened
        while not self.stop.requested:
            for notify in conn.notifies(timeout=1.0):
                self.events.put(("due", *parse_due(notify.payload)))
