"""What the stages of the pipeline exchange: statuses, priorities, the wake-up channel, the
counts, and sending a message again. Contract: docs/contract.md.

The stages (ingest, dispatch, serve) never import each other; they meet in Postgres, and this
module is the vocabulary they share there:

- `Status` and `Priority`, as the `notification` table stores them;
- the `smsq_due` channel on which a stage that makes a row due wakes the dispatchers: one
  encoder (`due_payload`), one decoder (`parse_due`);
- the counts by status and priority (the deltas of migration 0004), the oldest due message,
  each sender's bucket as its dispatcher wrote it;
- `send_again`: a sent message whose delivery failed, back to pending (a 30001 callback in
  serve, `smsq retry --undelivered` in ops);
- the connection overrides smsq appends to its status callback URL (dispatch writes them,
  serve checks signatures with them).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row


class Status(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    SENT = "sent"
    ERRORED = "errored"
    FAILED = "failed"
    CANCELED = "canceled"


class Priority(StrEnum):
    """In the order they are sent: `rank` is notification.priority_rank (0 goes first)."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @property
    def rank(self) -> int:
        return PRIORITY_RANK[self]


STATUSES = tuple(Status)
NOT_DONE = (Status.PENDING, Status.PROCESSING)  # the backlog
FINISHED = (Status.SENT, Status.ERRORED, Status.FAILED, Status.CANCELED)
PRIORITIES = tuple(Priority)
PRIORITY_RANK = {priority.value: rank for rank, priority in enumerate(PRIORITIES)}
LOWEST_RANK = len(PRIORITIES) - 1

# Delivery failures after acceptance that Twilio asks senders to send again: queue overflow
# (30001) and 10DLC throughput exceeded (30022).
RESEND_AFTER_FAILURE = frozenset({30001, 30022})

# -- the wake-up channel ----------------------------------------------------------------------

DUE_CHANNEL = "smsq_due"


def due_payload(sender: str, rank: int) -> str:
    """What a NOTIFY on `smsq_due` carries: the sender whose row became due, and its best
    priority rank. The sender comes first and may hold spaces; the rank never does."""
    return f"{sender} {rank}"


def parse_due(payload: str) -> tuple[str, int]:
    sender, _, rank = payload.rpartition(" ")
    return sender, int(rank)


_NOTIFY = "SELECT pg_notify('smsq_due', payload) FROM unnest(%s::text[]) AS payload"


def wake_dispatchers(conn: psycopg.Connection, due: Iterable[tuple[str, int]]) -> None:
    """Announce (sender, rank) pairs; delivered when the caller's transaction commits."""
    payloads = [due_payload(sender, rank) for sender, rank in due]
    if payloads:
        conn.execute(_NOTIFY, (payloads,))


_DUE_NOW = """
SELECT sender, min(priority_rank) FROM notification
WHERE id = ANY(%s::uuid[]) AND publish_datetime <= now()
GROUP BY sender
"""


def wake_for(conn: psycopg.Connection, ids: Sequence[uuid.UUID]) -> None:
    """Wake the dispatchers of the senders these rows belong to, where they are due now."""
    if ids:
        wake_dispatchers(conn, conn.execute(_DUE_NOW, (list(ids),)).fetchall())

# -- counts and the state of the senders -------------------------------------------------------

# A dispatcher names its lock connection so: pg_stat_activity then lists the dispatchers
# alive, and Postgres forgets a dead one the moment its connection goes.
LOCK_CONNECTION_PREFIX = "smsq dispatch locks "

_DISPATCHERS = """
SELECT d.holder, d.started_datetime, d.updated_datetime, d.senders_held, d.stopped_datetime,
       EXISTS (SELECT 1 FROM pg_stat_activity a
               WHERE a.datname = current_database()
                 AND a.application_name = %(prefix)s || d.holder) AS alive
FROM dispatcher d
WHERE d.stopped_datetime IS NULL OR d.stopped_datetime > now() - interval '1 hour'
ORDER BY d.started_datetime
"""


def dispatchers(conn: psycopg.Connection) -> list[dict]:
    """The dispatchers running, and those that stopped or died in the last hour: `alive` is
    whether its lock connection is open now (Postgres's word, not the dispatcher's)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_DISPATCHERS, {"prefix": LOCK_CONNECTION_PREFIX}).fetchall()

def counts_by_status(conn: psycopg.Connection) -> list[tuple[str, str, int]]:
    """(status, priority, count), from the deltas the triggers of migration 0004 append."""
    return conn.execute(
        """SELECT status, priority, sum(delta)::bigint FROM notification_count_delta
           GROUP BY 1, 2 HAVING sum(delta) <> 0 ORDER BY 1, 2""").fetchall()


def counts_table(conn: psycopg.Connection) -> dict[str, dict[str, int]]:
    """{status: {priority: count}} with every status and priority, 0 where there is none."""
    table: dict[str, dict[str, int]] = {
        status: dict.fromkeys(PRIORITIES, 0) for status in STATUSES}
    for status, priority, count in counts_by_status(conn):
        table[status][priority] = count
    return table


def backlog_counts(conn: psycopg.Connection) -> list[tuple[str, str, int]]:
    """(status, priority, count) of the messages not yet done: pending and processing."""
    return [c for c in counts_by_status(conn) if c[0] in NOT_DONE]


FOLD_COUNTS_EVERY_SECONDS = 60.0


def fold_counts(conn: psycopg.Connection) -> int:
    """Replace the appended deltas by one row per (status, priority); how many were folded.

    Run now and then by `smsq dispatch` and `smsq serve`, so the deltas stay few whatever
    runs. Writers keep appending meanwhile: the DELETE only takes the rows its snapshot
    sees, and a concurrent fold waits for this one, then finds those rows gone.
    """
    return scalar(conn.execute(
        """WITH folded AS (DELETE FROM notification_count_delta RETURNING status, priority, delta),
                kept AS (INSERT INTO notification_count_delta (status, priority, delta)
                         SELECT status, priority, sum(delta) FROM folded
                         GROUP BY 1, 2 HAVING sum(delta) <> 0)
           SELECT count(*) FROM folded"""))


def sender_buckets(conn: psycopg.Connection) -> list[dict]:
    """Each sender's token bucket as its dispatcher last wrote it (table dispatch_sender),
    and `tokens_now`: refilled at its rate since then, up to its capacity. A sender paused
    by an account-wide error has `pause_reason`, `pause_message` and `paused_for_seconds`
    (until its next try; negative while that try is on its way)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            """SELECT *, least(capacity, tokens + rate * greatest(age_seconds, 0)) AS tokens_now
               FROM (SELECT sender, address, holder, tokens, rate, capacity, updated_datetime,
                            extract(epoch FROM now() - updated_datetime)::float AS age_seconds,
                            pause_reason, pause_message,
                            -- a pause ends by its time even if nobody wrote since
                            CASE WHEN pause_reason IS NOT NULL AND holder IS NOT NULL THEN
                                 extract(epoch FROM paused_until - now())::float
                            END AS paused_for_seconds
                     FROM dispatch_sender) b
               ORDER BY sender"""
        ).fetchall()


# The oldest due message without reading every pending row: a skip scan over the senders
# of notification_due_idx, then the first row of each (sender, priority) group.
_OLDEST_DUE = """
WITH RECURSIVE senders(sender) AS (
    (SELECT sender FROM notification WHERE status = 'pending' ORDER BY sender LIMIT 1)
    UNION ALL
    SELECT (SELECT n.sender FROM notification n
            WHERE n.status = 'pending' AND n.sender > s.sender ORDER BY n.sender LIMIT 1)
    FROM senders s WHERE s.sender IS NOT NULL
)
SELECT extract(epoch FROM now() - min(first_due.publish_datetime))
FROM senders s
CROSS JOIN (VALUES (0::smallint), (1::smallint), (2::smallint)) AS ranks(rank)
CROSS JOIN LATERAL (
    SELECT n.publish_datetime FROM notification n
    WHERE n.status = 'pending' AND n.sender = s.sender AND n.priority_rank = ranks.rank
    ORDER BY n.publish_datetime LIMIT 1
) first_due
WHERE s.sender IS NOT NULL AND first_due.publish_datetime <= now()
"""


def oldest_due_age_seconds(conn: psycopg.Connection) -> float | None:
    age = scalar(conn.execute(_OLDEST_DUE))
    return float(age) if age is not None else None


# -- sending a message again ---------------------------------------------------------------

# A sent message whose delivery failed, sent again: its SID is kept as superseded (still
# ours: reconciliation never takes it for the new send, and its late callbacks are known),
# the row is pending again, due after `delay` seconds.
_SEND_AGAIN = """
WITH chosen AS (
    SELECT n.id FROM notification n JOIN sms_notification s ON s.notification_id = n.id
    WHERE n.id = ANY(%(ids)s::uuid[]) AND n.status = 'sent'
      AND (%(delivery)s::text[] IS NULL OR s.delivery_status = ANY(%(delivery)s::text[]))
    FOR UPDATE OF n
), superseded AS (
    INSERT INTO twilio_superseded_sid (sid, notification_id, delivery_status, error_code,
                                       sent_datetime, price, price_unit)
    SELECT s.twilio_sid, s.notification_id, coalesce(%(delivery_status)s, s.delivery_status),
           coalesce(%(error_code)s, s.error_code), n.sent_datetime, s.price, s.price_unit
    FROM chosen JOIN sms_notification s ON s.notification_id = chosen.id
    JOIN notification n ON n.id = chosen.id
    WHERE s.twilio_sid IS NOT NULL
    ON CONFLICT (sid) DO NOTHING
), sms AS (
    UPDATE sms_notification s
    SET twilio_sid = NULL, delivery_status = NULL, segments = NULL, reconcile_checks = 0,
        price = NULL, price_unit = NULL,  -- the first sending's price stays with its SID
        error_code = coalesce(%(error_code)s, s.error_code),
        attempts = CASE WHEN %(fresh_attempts)s THEN 0 ELSE s.attempts END
    FROM chosen WHERE s.notification_id = chosen.id
)
UPDATE notification n
SET status = 'pending', status_message = %(message)s, sent_datetime = NULL,
    retry_datetime = now() + make_interval(secs => %(delay)s)
FROM chosen WHERE n.id = chosen.id
RETURNING n.id
"""


def send_again(conn: psycopg.Connection, ids: Sequence[uuid.UUID], message: str, *,
               delay: float = 0.0, error_code: int | None = None,
               delivery_status: str | None = None,
               only_delivery: Sequence[str] | None = None,
               fresh_attempts: bool = False) -> list[uuid.UUID]:
    """Sent notifications back to pending, to be sent again; the ids that were.

    Runs in the caller's transaction, and wakes the dispatchers at its commit.
    """
    rows = conn.execute(_SEND_AGAIN, {
        "ids": list(ids), "message": message, "delay": delay, "error_code": error_code,
        "delivery_status": delivery_status, "fresh_attempts": fresh_attempts,
        "delivery": list(only_delivery) if only_delivery is not None else None}).fetchall()
    again = [row[0] for row in rows]
    wake_for(conn, again)
    return again


def scalar(cursor: psycopg.Cursor[Any]) -> Any:
    """The first column of a query that always returns one row (an aggregate, a function)."""
    row = cursor.fetchone()
    assert row is not None, "the query returned no row"
    return row[0]


# -- guard rails: the suppression list, what the guards stopped, the daily budget -------------

UNSUBSCRIBED = 21610  # Twilio's "Attempt to send to unsubscribed recipient"


class SuppressionReason(StrEnum):
    """Why a number is on the suppression list (suppressed_number.reason)."""

    OPT_OUT = "opt_out"  # the recipient texted an opt-out keyword (POST /twilio/inbound)
    TWILIO = "twilio_21610"  # Twilio answered 21610: it blocks the number itself
    OPERATOR = "operator"  # smsq suppress add, or the dashboard
    UNKNOWN_NUMBER = "unknown_number"  # a callback said 30005: the number does not exist
    LANDLINE = "landline"  # a callback said 30006: a landline, which cannot receive SMS


# What an opt-in keyword lifts: only what the recipient's side put there. A number an
# operator suppressed stays suppressed whatever its owner texts.
LIFTED_BY_OPT_IN = (SuppressionReason.OPT_OUT, SuppressionReason.TWILIO)


class Guard(StrEnum):
    """What a guard rail of dispatch stopped, as counted per UTC day in guard_count."""

    SUPPRESSED = "suppressed"  # a notification to a suppressed number: errored, not sent
    CAPPED = "capped"  # one over SMSQ_RECIPIENT_LIMIT: errored, not sent
    BUDGET_PAUSED = "budget_paused"  # a sender paused by SMSQ_DAILY_SEGMENT_LIMIT


BUDGET_PAUSE_REASON = "daily_budget"  # dispatch_sender.pause_reason of a budget pause


def count_guard(conn: psycopg.Connection, guard: Guard, count: int = 1) -> None:
    if count:
        conn.execute(
            """INSERT INTO guard_count (day, guard, count)
               VALUES ((now() AT TIME ZONE 'UTC')::date, %s, %s)
               ON CONFLICT (day, guard) DO UPDATE SET count = guard_count.count + excluded.count""",
            (guard.value, count))


def guard_summary(conn: psycopg.Connection) -> dict:
    """What `smsq status` and the dashboard show of the guard rails: today's counts of each
    guard, the numbers suppressed (by reason), and each sender's segments today."""
    today: dict[str, int] = dict(conn.execute(
        """SELECT guard, count FROM guard_count
           WHERE day = (now() AT TIME ZONE 'UTC')::date""").fetchall())
    by_reason: dict[str, int] = dict(conn.execute(
        "SELECT reason, count(*) FROM suppressed_number GROUP BY 1 ORDER BY 1").fetchall())
    segments: dict[str, int] = dict(conn.execute(
        """SELECT sender, segments FROM sender_day_segments
           WHERE day = (now() AT TIME ZONE 'UTC')::date ORDER BY sender""").fetchall())
    return {"today": {guard.value: today.get(guard.value, 0) for guard in Guard},
            "suppressed_numbers": sum(by_reason.values()), "suppressed_by_reason": by_reason,
            "segments_today": segments}
# -- the status callback URL -----------------------------------------------------------------

# Twilio's webhook connection overrides, as the URL fragment of every StatusCallback: retry
# up to 5 times on any failure (connect or read timeout, 4xx, 5xx), connect within 2 s,
# answer within 5 s, everything within 15 s. A receipt lost to a restart of serve is
# posted again instead of lost. The fragment never travels in the request itself.
CALLBACK_OVERRIDES = "rc=5&rp=all&ct=2000&rt=5000&tt=15000"
