"""Helpers of the dispatcher's tests: notifications stored as ingest stores them, a dispatcher
running in a thread of the test or as its own process, and what Twilio (the fake) received."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import psycopg
from pydantic import AnyHttpUrl, SecretStr

from consumer.dispatch.loop import Dispatcher
from consumer.ingest import storage
from consumer.settings import Settings
from consumer.signals import StopSignal
from schemas.message import Notification

SENDER = "+15005550006"  # Twilio's "valid From" test number
TO = "+14155550123"


def dispatch_settings(settings: Settings, fake, **changes: object) -> Settings:
    """Settings of a dispatcher sending to `fake`, with quick retries and a short lease."""
    values = {
        "twilio_api_url": AnyHttpUrl(fake.url),
        "twilio_account_sid": fake.account_sid,
        "twilio_auth_token": SecretStr(fake.auth_token),
        "twilio_phone_number": SENDER,
        "twilio_sms_rate": 50.0,
        "smsq_retry_backoff": 0.2,
        "smsq_retry_backoff_max": 1.0,
        "smsq_lease_seconds": 2.0,
        "smsq_twilio_read_timeout": 2.0,
        # No fallback poll within a test: notifications, publish and retry times must wake it.
        "smsq_dispatch_poll_seconds": 600.0,
    }
    values.update(changes)
    return settings.model_copy(update=values)


def add_notifications(settings: Settings, *messages: dict, sender: str = "") -> list[uuid.UUID]:
    """Store messages exactly as `smsq consume` does (including its NOTIFY); return their ids."""
    now = datetime.now(timezone.utc)
    rows = []
    for message in messages:
        message = {"body": "hello", "sms": {"to_phone_number": TO}} | message
        notification = Notification.model_validate(message).with_defaults(uuid.uuid4(), now)
        rows.append(storage.IngestRow.of(notification, sender))
    with psycopg.connect(settings.database_dsn) as conn:
        storage.prepare_ingest(conn)
        storage.insert_batch(conn, rows)
        conn.commit()
    return [row.notification.id for row in rows]


def rows_by_id(settings: Settings) -> dict[uuid.UUID, dict]:
    with psycopg.connect(settings.database_dsn) as conn, conn.cursor(
            row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("""SELECT n.id, n.status, n.status_message, n.sent_datetime, n.claimed_by,
                              n.retry_datetime, s.twilio_sid, s.segments, s.attempts,
                              s.error_code, s.to_phone_number
                       FROM notification n JOIN sms_notification s ON s.notification_id = n.id""")
        return {row["id"]: row for row in cur.fetchall()}


def statuses(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.database_dsn) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM notification GROUP BY 1").fetchall())


@contextmanager
def running_dispatcher(settings: Settings) -> Iterator[Dispatcher]:
    """A dispatcher in a thread of this test, stopped (and checked stopped) at the end."""
    stop = StopSignal()
    dispatcher = Dispatcher(settings, stop)
    thread = threading.Thread(target=dispatcher.run, name="dispatcher", daemon=True)
    thread.start()
    try:
        yield dispatcher
    finally:
        stop.request()
        thread.join(timeout=10)
        assert not thread.is_alive(), "dispatcher did not stop within 10 s"


def arrivals(fake, accepted_only: bool = True) -> list[dict]:
    """What the fake received, in arrival order."""
    return fake.messages(accepted_only=accepted_only)


def most_in_any_window(times: list[float], window: float = 1.0,
                       weights: list[float] | None = None) -> float:
    """The largest total weight (default 1 each) of events inside any `window` seconds."""
    weights = weights or [1.0] * len(times)
    events = sorted(zip(times, weights))
    best, start, total = 0.0, 0, 0.0
    for at, weight in events:
        total += weight
        while at - events[start][0] >= window:
            total -= events[start][1]
            start += 1
        best = max(best, total)
    return best
