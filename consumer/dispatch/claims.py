"""Every SQL statement of `smsq dispatch`; the dispatcher loop calls only this.

Connections are autocommit: each call is one short transaction (most are one statement; the
claim is two that must see the same now()), and none is ever open while a Twilio request is
on the wire.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from functools import cached_property
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import RowMaker

from consumer.dispatch.twilio_client import Outgoing
from consumer.pipeline import LOCK_CONNECTION_PREFIX, UNSUBSCRIBED, SuppressionReason, scalar
from consumer.segments import cost_of

ALL_RANKS = 2  # a claim of every priority (scheduler.ALL_RANKS)
# The status message of a notification claimed without its sms_notification row.
NO_SMS_PART = "failed in smsq: no sms_notification row (written around smsq?): nothing to send"

# First key of the two-key advisory locks that give a dispatcher a sender; the second key
# is hashtext(sender). Two senders hashing alike share a lock: one dispatcher paces both.
SENDER_LOCK_NAMESPACE = 0x736D_7371  # "smsq"


@dataclass
class ClaimedRow:
    """A notification in `processing`, as the dispatcher needs it to send or reconcile it."""

    id: UUID
    sender: str
    priority_rank: int
    publish_datetime: datetime
    expire_datetime: datetime | None
    body: str
    claimed_datetime: datetime
    to_phone_number: str
    media_url: list[str]
    media_token: str | None
    attempts: int
    reconcile_checks: int = 0
    lease_expired: bool = False
    suppressed: bool = False  # claimed to a suppressed number: errored by the claim itself
    # Failed by the claim itself: no sms_notification row, so the fields of the sms part
    # (claimed_datetime on) are None. Returned only to be logged and counted.
    without_sms_part: bool = False

    @cached_property  # asked several times a send; body and media never change after the claim
    def cost(self) -> int:
        """Tokens it takes from its sender's bucket: its segments, or one for an MMS."""
        return cost_of(self.body, has_media=bool(self.media_url or self.media_token))

    def outgoing(self, address: str) -> Outgoing:
        """The message as it leaves, from `address` (a number or a Messaging Service)."""
        return Outgoing(to=self.to_phone_number, sender_address=address, body=self.body,
                        media_url=tuple(self.media_url), media_token=self.media_token,
                        notification_id=self.id, expire_datetime=self.expire_datetime)


_CLAIMED_ROW_FIELDS = [f.name for f in fields(ClaimedRow)]


def claimed_rows(cursor: psycopg.Cursor[Any]) -> RowMaker[ClaimedRow]:
    """A row factory: ClaimedRow(*values). psycopg's class_row builds a dict for every row,
    0.37 ms of Python for a claim of 100 rows instead of 0.20. The columns must be the
    first fields of ClaimedRow, in order; checked once per statement."""
    names = [column.name for column in cursor.description or ()]
    if names != _CLAIMED_ROW_FIELDS[:len(names)]:
        raise ValueError(f"columns {names} are not the first fields of ClaimedRow")

    def make(values: Sequence[Any]) -> ClaimedRow:
        return ClaimedRow(*values)
    return make


@dataclass(frozen=True)
class Outcome:
    """What to write for one row. status is the row's status afterwards.

    `attempted` adds one to sms_notification.attempts (a request went to Twilio);
    `lease_seconds` keeps a `processing` row leased that long (an unknown outcome, to be
    reconciled when it expires); `retry_in` sets retry_datetime for a row back in `pending`.
    """

    id: UUID
    status: str
    status_message: str = ""
    sid: str | None = None
    segments: int | None = None
    error_code: int | None = None
    retry_in: float | None = None
    lease_seconds: float | None = None
    attempted: bool = True
    sent_datetime: datetime | None = None
    reconcile_checks: int | None = None  # None: as it is


# An Outcome's fields as a tuple, in order (for _RECORD); UUIDs and datetimes become their
# str(), which Postgres reads back as uuid and timestamptz.
_outcome_fields = operator.attrgetter(*(f.name for f in fields(Outcome)))

_ROW_COLUMNS = """
    c.id, c.sender, c.priority_rank, c.publish_datetime, c.expire_datetime, c.body,
    c.claimed_datetime, s.to_phone_number, s.media_url, m.access_token AS media_token,
    s.attempts, s.reconcile_checks
"""

# Public: bench/dispatch.py explains it against a million pending rows.
# A due row to a suppressed number (one primary-key probe each) becomes errored right here,
# with Twilio's code for an unsubscribed recipient: never sent, never paced.
# Claims for many senders in one statement: one (sender, limit, max rank) request each, the
# rows of each found by their own index scan (LATERAL), the best first.
# The locked rows are found again by key = ANY(ARRAY(...)), a primary-key probe each in any
# plan: for `LIMIT req.lim` (a column) Postgres guesses a tenth of the due rows, and joined by
# that guess a million pending rows were hashed whole (2.7 s a claim instead of 3 ms). Each
# row's sms_notification is read once, after the row is locked, and carried along.
CLAIM_DUE = f"""
WITH req AS (
    SELECT * FROM unnest(%(senders)s::text[], %(limits)s::int[], %(max_ranks)s::int[])
        AS r(sender, lim, max_rank)
), locked AS (
    SELECT d.id FROM req CROSS JOIN LATERAL (
        SELECT id FROM notification
        WHERE status = 'pending' AND sender = req.sender AND priority_rank <= req.max_rank
          AND publish_datetime <= now()
          AND (retry_datetime IS NULL OR retry_datetime <= now())
        ORDER BY priority_rank, publish_datetime
        LIMIT req.lim
        FOR UPDATE SKIP LOCKED) d
), due AS (
    SELECT s.notification_id AS id, s.to_phone_number, s.media_url, s.temporary_media_id,
           s.attempts, s.reconcile_checks,
           (SELECT x.reason FROM suppressed_number x
            WHERE x.phone_number = s.to_phone_number) AS suppressed_as
    FROM sms_notification s WHERE s.notification_id = ANY(ARRAY(SELECT id FROM locked))
), c AS (
    UPDATE notification n
    SET status = CASE WHEN due.suppressed_as IS NULL THEN 'processing' ELSE 'errored' END,
        status_message = CASE WHEN due.suppressed_as IS NULL THEN n.status_message
            ELSE 'not sent: the number is suppressed (on the suppression list, '
                 || due.suppressed_as || ')' END,
        claimed_by = CASE WHEN due.suppressed_as IS NULL THEN %(holder)s END,
        claimed_datetime = CASE WHEN due.suppressed_as IS NULL THEN now() END,
        lease_expire_datetime = CASE WHEN due.suppressed_as IS NULL
                                     THEN now() + make_interval(secs => %(lease)s) END
    -- The ANY finds the rows by key; the join only pairs each with its own values.
    FROM due WHERE n.id = ANY(ARRAY(SELECT id FROM due)) AND n.id = due.id
    RETURNING n.id, n.sender, n.priority_rank, n.publish_datetime, n.expire_datetime, n.body,
              n.claimed_datetime, due.to_phone_number, due.media_url, due.temporary_media_id,
              due.attempts, due.reconcile_checks, due.suppressed_as IS NOT NULL AS suppressed
), without_sms_part AS (
    -- A row written around smsq without its sms_notification has nothing to send. Left
    -- pending, it would take the first place in every claim of its sender, for ever. The
    -- set difference is empty but for such rows: no probe at all in the common case.
    UPDATE notification n SET status = 'failed', status_message = '{NO_SMS_PART}'
    WHERE n.id = ANY(ARRAY(SELECT id FROM locked EXCEPT SELECT id FROM due))
    RETURNING n.id, n.sender, n.priority_rank, n.publish_datetime, n.expire_datetime, n.body
), unsubscribed AS (
    UPDATE sms_notification s SET error_code = {UNSUBSCRIBED}
    WHERE s.notification_id = ANY(ARRAY(SELECT id FROM due WHERE suppressed_as IS NOT NULL))
)
SELECT c.id, c.sender, c.priority_rank, c.publish_datetime, c.expire_datetime, c.body,
       c.claimed_datetime, c.to_phone_number, c.media_url, m.access_token AS media_token,
       c.attempts, c.reconcile_checks, false AS lease_expired, c.suppressed,
       false AS without_sms_part
FROM c LEFT JOIN sms_temporary_media m ON m.id = c.temporary_media_id
UNION ALL
SELECT w.id, w.sender, w.priority_rank, w.publish_datetime, w.expire_datetime, w.body,
       NULL, NULL, NULL, NULL, NULL, NULL, false, false, true
FROM without_sms_part w
"""

# Rows of these senders left in processing by anyone but what this process has in hand.
_STALE = f"""
SELECT {_ROW_COLUMNS}, c.lease_expire_datetime < now() AS lease_expired
FROM notification c JOIN sms_notification s ON s.notification_id = c.id
LEFT JOIN sms_temporary_media m ON m.id = s.temporary_media_id
WHERE c.status = 'processing' AND c.sender = ANY(%(senders)s)
  AND (NOT %(expired_only)s OR c.lease_expire_datetime < now())
"""

# One statement for a whole batch of outcomes, which arrive as one JSON array of arrays (each
# an Outcome's fields, in order). The standard library writes that in C: for 13 outcomes,
# 31 us of the dispatcher's Python instead of 63 for eleven binary arrays, whose element
# types psycopg looks up again on every call (and 860-1250 us for 50 as text arrays).
_RECORD = f"""
WITH o AS (
    SELECT (e->>0)::uuid AS id, e->>1 AS status, e->>2 AS status_message, e->>3 AS sid,
           (e->>4)::int AS segments, (e->>5)::int AS error_code, (e->>6)::float8 AS retry_in,
           (e->>7)::float8 AS lease_seconds, (e->>8)::bool AS attempted,
           (e->>9)::timestamptz AS sent_datetime, (e->>10)::int AS reconcile_checks
    FROM jsonb_array_elements(%(outcomes)s::jsonb) e
), n AS (
    UPDATE notification t SET
        status = o.status,
        status_message = o.status_message,
        sent_datetime = CASE WHEN o.status = 'sent' THEN coalesce(o.sent_datetime, now()) END,
        retry_datetime = now() + make_interval(secs => o.retry_in),
        lease_expire_datetime = now() + make_interval(secs => o.lease_seconds),
        claimed_by = CASE WHEN o.status = 'processing' THEN t.claimed_by END,
        claimed_datetime = CASE WHEN o.status = 'processing' THEN t.claimed_datetime END
    FROM o
    -- Twilio's acceptance wins even over a row that a reconciliation put back meanwhile;
    -- any other outcome only lands on a row still in processing.
    WHERE t.id = o.id AND (t.status = 'processing'
                           OR (o.status = 'sent' AND t.status = 'pending'))
    RETURNING t.id
), unsubscribed AS (
    -- Twilio blocks this number (21610): nothing goes to it again until it opts in.
    INSERT INTO suppressed_number (phone_number, reason, detail)
    SELECT DISTINCT ON (s.to_phone_number) s.to_phone_number, '{SuppressionReason.TWILIO.value}',
           o.status_message
    FROM n JOIN o ON o.id = n.id JOIN sms_notification s ON s.notification_id = n.id
    WHERE o.status = 'errored' AND o.error_code = {UNSUBSCRIBED}
    ON CONFLICT (phone_number) DO NOTHING
), unsent AS (
    -- A place under SMSQ_RECIPIENT_LIMIT taken for this attempt (after its claim) is given
    -- back when the answer proves nothing was sent. (CTEs read the rows as before this
    -- statement: t.claimed_datetime is the attempt's claim.)
    DELETE FROM recipient_send r USING o, notification t
    WHERE r.notification_id = o.id AND t.id = o.id AND t.status = 'processing'
      AND o.status IN ('pending', 'errored', 'failed') AND r.sent_datetime >= t.claimed_datetime
), spent AS (
    INSERT INTO sender_day_segments AS d (sender, day, segments)
    SELECT t.sender, (coalesce(o.sent_datetime, now()) AT TIME ZONE 'UTC')::date,
           sum(coalesce(o.segments, 1))
    FROM n JOIN o ON o.id = n.id JOIN notification t ON t.id = n.id
    WHERE o.status = 'sent'
    GROUP BY 1, 2
    ON CONFLICT (sender, day) DO UPDATE SET segments = d.segments + excluded.segments
)
UPDATE sms_notification s SET
    twilio_sid = coalesce(o.sid, s.twilio_sid),
    segments = coalesce(o.segments, s.segments),
    error_code = o.error_code,
    attempts = s.attempts + o.attempted::int,
    reconcile_checks = coalesce(o.reconcile_checks, s.reconcile_checks)
FROM n JOIN o ON o.id = n.id
WHERE s.notification_id = n.id
"""

# Rows never sent go back to pending with any place under SMSQ_RECIPIENT_LIMIT they took for
# this claim (the CTE reads claimed_datetime as it was): sent later, they take one again.
# `unheld_only`: not a row whose sender another session holds (it may be reconciling the row:
# put back to pending under it, the row would be claimed and sent while its lookup decides the
# row was never sent). The try-lock is a transaction's: it conflicts with the holder's
# session lock, and it is gone at the commit.
_RELEASE = f"""
WITH released AS (
    UPDATE notification
    SET status = 'pending', claimed_by = NULL, claimed_datetime = NULL,
        lease_expire_datetime = NULL
    WHERE id = ANY(%(ids)s) AND status = 'processing' AND claimed_by = %(holder)s
      AND (NOT %(unheld_only)s
           OR pg_try_advisory_xact_lock({SENDER_LOCK_NAMESPACE}, hashtext(sender)))
    RETURNING id
), places AS (
    DELETE FROM recipient_send r USING notification t
    WHERE t.id = ANY(ARRAY(SELECT id FROM released)) AND r.notification_id = t.id
      AND r.sent_datetime >= t.claimed_datetime
)
SELECT count(*) FROM released
"""

_RENEW = """
UPDATE notification SET lease_expire_datetime = now() + make_interval(secs => %s)
WHERE id = ANY(%s) AND status = 'processing' AND claimed_by = %s
"""

# When the next pending row of a sender becomes due: one index probe per priority for
# publish times (notification_due_idx), one for retry times (notification_retry_idx).
_NEXT_DUE = """
SELECT extract(epoch FROM least(
    (SELECT min(p.next) FROM (VALUES (0), (1), (2)) r(rank), LATERAL (
        SELECT publish_datetime AS next FROM notification
        WHERE status = 'pending' AND sender = %(sender)s AND priority_rank = r.rank
          AND publish_datetime > now()
        ORDER BY publish_datetime LIMIT 1) p),
    (SELECT min(retry_datetime) FROM notification
     WHERE status = 'pending' AND sender = %(sender)s AND retry_datetime IS NOT NULL
       AND retry_datetime > now())
) - now())
"""

# Every held sender's bucket in one statement, each column an array (binary, as in _RECORD):
# at 300 senders a dispatcher saves 300 rows a second.
_SAVE_BUCKETS = """
INSERT INTO dispatch_sender (sender, address, holder, tokens, rate, capacity, paused_until,
                             pause_reason, pause_message, released_datetime, updated_datetime)
SELECT b.sender, b.address, b.holder, b.tokens, b.rate, b.capacity,
       now() + make_interval(secs => b.paused_for), b.pause_reason, b.pause_message,
       CASE WHEN b.holder IS NULL THEN now() END, now()
FROM unnest(%b::text[], %b::text[], %b::text[], %b::float8[], %b::float8[], %b::float8[],
            %b::float8[], %b::text[], %b::text[])
     AS b(sender, address, holder, tokens, rate, capacity, paused_for, pause_reason,
          pause_message)
ORDER BY b.sender  -- the same lock order in every dispatcher
ON CONFLICT (sender) DO UPDATE SET
    address = excluded.address, holder = excluded.holder, tokens = excluded.tokens,
    rate = excluded.rate, capacity = excluded.capacity, paused_until = excluded.paused_until,
    pause_reason = excluded.pause_reason, pause_message = excluded.pause_message,
    released_datetime = excluded.released_datetime, updated_datetime = now()
"""

# The claim could not load its rows: a timestamp outside what Python holds (stored before
# validation refused such times, or written by hand). Those rows become failed, so the
# sender's other rows go on.
_FAIL_UNLOADABLE = """
UPDATE notification SET status = 'failed', status_message = %(message)s
WHERE status = 'pending' AND sender = %(sender)s
  AND (publish_datetime NOT BETWEEN '0001-01-02 00:00+00' AND '9999-12-30 00:00+00'
       OR expire_datetime NOT BETWEEN '0001-01-02 00:00+00' AND '9999-12-30 00:00+00')
RETURNING id
"""

_FAIL_ONE = """
UPDATE notification SET status = 'failed', status_message = %s
WHERE id = %s AND status = 'processing'
"""


# Senders nobody holds: no session holds their advisory lock (pg_locks keeps the second key
# as an oid, the unsigned form of hashtext's int4).
_FREE_SENDERS = """
SELECT s FROM unnest(%(senders)s::text[]) s
WHERE NOT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database
                                                    WHERE datname = current_database())
      AND l.classid = %(namespace)s AND l.objsubid = 2
      AND l.objid = (hashtext(s)::bigint & 4294967295)::oid)
"""

_LIVE_DISPATCHERS = """
SELECT count(DISTINCT application_name) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE %s
"""

_HEARTBEAT = """
INSERT INTO dispatcher (holder, senders_held) VALUES (%(holder)s, %(held)s)
ON CONFLICT (holder) DO UPDATE SET senders_held = excluded.senders_held,
                                   updated_datetime = now(), stopped_datetime = NULL
"""


def free_senders(conn: psycopg.Connection, senders: list[str]) -> list[str]:
    """The senders whose lock nobody holds now (a hint: taking one may still fail)."""
    rows = conn.execute(_FREE_SENDERS, {"senders": senders,
                                        "namespace": SENDER_LOCK_NAMESPACE}).fetchall()
    return [row[0] for row in rows]


def try_lock_senders(conn: psycopg.Connection, senders: list[str]) -> list[str]:
    """Take the advisory lock of each sender that nobody holds; return those now held.

    Session-level locks: they stay with this connection until released or until the
    connection ends, which is what frees them when a dispatcher is killed.
    """
    rows = conn.execute(
        "SELECT s FROM unnest(%s::text[]) s WHERE pg_try_advisory_lock(%s, hashtext(s))",
        (senders, SENDER_LOCK_NAMESPACE),
    ).fetchall()
    return [row[0] for row in rows]


def unlock_sender(conn: psycopg.Connection, sender: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (SENDER_LOCK_NAMESPACE, sender))


def live_dispatchers(conn: psycopg.Connection) -> int:
    """Dispatchers whose lock connection is open now, this one included."""
    return scalar(conn.execute(_LIVE_DISPATCHERS, (LOCK_CONNECTION_PREFIX + "%",)))


def heartbeat(conn: psycopg.Connection, holder: str, held: int) -> None:
    conn.execute(_HEARTBEAT, {"holder": holder, "held": held})


def dispatcher_stopped(conn: psycopg.Connection, holder: str) -> None:
    conn.execute("UPDATE dispatcher SET stopped_datetime = now(), senders_held = 0, "
                 "updated_datetime = now() WHERE holder = %s", (holder,))
    conn.execute("DELETE FROM dispatcher WHERE coalesce(stopped_datetime, updated_datetime) "
                 "< now() - interval '1 day'")


# A sender taken over: its bucket as the last holder left it, refilled since at the pace kept
# (not the row's configured rate), if handed over cleanly; empty if it died mid-send.
_INHERITED_TOKENS = """
SELECT CASE WHEN released_datetime IS NOT NULL THEN
            least(capacity, tokens + %(pace)s * extract(epoch FROM now() - released_datetime))
       ELSE 0 END
FROM dispatch_sender WHERE sender = %(sender)s
"""

# Rows a previous holder left in processing: once its requests can no longer be on the wire
# (connect and read timeouts and a tick since it lost the sender, which was before now), one
# reconciliation that finds nothing may send them again. Not sooner, even if their lease ends
# first; not later, however long their lease.
_TAKE_OVER_ROWS = """
WITH taken AS (
    UPDATE notification
    SET lease_expire_datetime = now() + make_interval(secs => %(wire_seconds)s)
    WHERE status = 'processing' AND sender = %(sender)s AND claimed_by IS DISTINCT FROM %(holder)s
    RETURNING id
)
UPDATE sms_notification s SET reconcile_checks = greatest(s.reconcile_checks, %(checks)s)
FROM taken WHERE s.notification_id = taken.id
"""


def inherited_tokens(conn: psycopg.Connection, sender: str, pace: float) -> float | None:
    """Tokens the next holder of `sender` (pacing at `pace`) starts with; None: never held."""
    row = conn.execute(_INHERITED_TOKENS, {"sender": sender, "pace": pace}).fetchone()
    return float(row[0]) if row else None


def take_over_rows(conn: psycopg.Connection, sender: str, holder: str, wire_seconds: float,
                   checks: int) -> None:
    conn.execute(_TAKE_OVER_ROWS, {"sender": sender, "holder": holder,
                                   "wire_seconds": wire_seconds, "checks": checks})


@dataclass
class Claim:
    rows: list[ClaimedRow]
    drained: bool = False  # fewer than asked were due
    next_due_in: float | None = None  # then: seconds until the next one is (None: none waits)
    suppressed: list[ClaimedRow] = field(default_factory=list)  # errored by the claim
    without_sms_part: list[ClaimedRow] = field(default_factory=list)  # failed by the claim


def claim_due(conn: psycopg.Connection, sender: str, holder: str, limit: int,
              lease_seconds: float, max_rank: int = 2) -> Claim:
    """Mark up to `limit` due rows of `sender` processing for `holder`, best first."""
    return claim_many(conn, [(sender, limit, max_rank)], holder, lease_seconds)[sender]


def claim_many(conn: psycopg.Connection, requests: list[tuple[str, int, int]], holder: str,
               lease_seconds: float) -> dict[str, Claim]:
    """Claim for each (sender, limit, max rank) at once: one statement, however many
    senders (a dispatcher of 1,000 senders claims hundreds of times a second otherwise).

    For a sender that got fewer rows than it asked for (and asked for every priority), also
    say when its next row will be due, in the same transaction: now() is one instant for
    both statements, so a row becoming due between them cannot fall through the gap.
    """
    senders, limits, ranks = (list(column) for column in zip(*requests))
    with conn.transaction(), conn.cursor(row_factory=claimed_rows) as cur:
        cur.execute(CLAIM_DUE, {"senders": senders, "limits": limits, "max_ranks": ranks,
                                "holder": holder, "lease": lease_seconds})
        claimed: dict[str, Claim] = {sender: Claim([]) for sender in senders}
        for row in cur.fetchall():
            claim = claimed[row.sender]
            if row.without_sms_part:
                claim.without_sms_part.append(row)
            else:
                (claim.suppressed if row.suppressed else claim.rows).append(row)
        for sender, limit, max_rank in requests:
            claim = claimed[sender]
            taken = len(claim.rows) + len(claim.suppressed) + len(claim.without_sms_part)
            if taken < limit and max_rank == ALL_RANKS:
                claim.drained = True
                claim.next_due_in = _seconds_until_next_due(conn, sender)
        return claimed


def stale_processing(conn: psycopg.Connection, senders: list[str],
                     expired_only: bool) -> list[ClaimedRow]:
    """Rows of `senders` in processing: with `expired_only`, those whose lease ran out."""
    with conn.cursor(row_factory=claimed_rows) as cur:
        cur.execute(_STALE, {"senders": senders, "expired_only": expired_only})
        return cur.fetchall()


def record_outcomes(conn: psycopg.Connection, outcomes: list[Outcome]) -> None:
    """Write a batch of outcomes with one statement (one transaction, one round trip)."""
    if outcomes:
        rows = json.dumps([_outcome_fields(o) for o in outcomes], default=str)
        conn.execute(_RECORD, {"outcomes": rows})


def release_unsent(conn: psycopg.Connection, ids: list[UUID], holder: str,
                   unheld_only: bool = False) -> int:
    """Hand rows claimed but never sent back to pending, as if never claimed; with
    `unheld_only`, only those of senders no other session holds (we hold none either)."""
    if not ids:
        return 0
    return scalar(conn.execute(_RELEASE, {"ids": ids, "holder": holder,
                                          "unheld_only": unheld_only}))


def renew_leases(conn: psycopg.Connection, ids: list[UUID], holder: str,
                 lease_seconds: float) -> None:
    if ids:
        conn.execute(_RENEW, (lease_seconds, ids, holder))


def _seconds_until_next_due(conn: psycopg.Connection, sender: str) -> float | None:
    """Seconds until a pending row of `sender` becomes due; None when none is waiting."""
    row = conn.execute(_NEXT_DUE, {"sender": sender}).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def recorded_sids(conn: psycopg.Connection, sids: list[str]) -> set[str]:
    """Which of these Twilio SIDs are already recorded for some notification, now or before
    it was sent again."""
    rows = conn.execute(
        """SELECT twilio_sid FROM sms_notification WHERE twilio_sid = ANY(%(sids)s)
           UNION SELECT sid FROM twilio_superseded_sid WHERE sid = ANY(%(sids)s)""",
        {"sids": sids}).fetchall()
    return {row[0] for row in rows}


def fail_unloadable(conn: psycopg.Connection, sender: str) -> list[UUID]:
    """Mark failed the pending rows of `sender` that no claim can load; their ids."""
    message = ("failed in smsq: publish_datetime or expire_datetime lies outside what "
               "smsq can hold (years 1 to 9999 in UTC)")
    rows = conn.execute(_FAIL_UNLOADABLE, {"sender": sender, "message": message}).fetchall()
    return [row[0] for row in rows]


def record_each(conn: psycopg.Connection, outcomes: list[Outcome]) -> list[UUID]:
    """Write outcomes one by one after a batch failed; a row whose own outcome cannot be
    written becomes failed with the reason. The ids that became failed so."""
    failed = []
    for outcome in outcomes:
        try:
            record_outcomes(conn, [outcome])
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            conn.execute(_FAIL_ONE, (f"failed in smsq: its outcome ({outcome.status}) could "
                                     f"not be written: {exc}"[:2000], outcome.id))
            failed.append(outcome.id)
    return failed


def save_buckets(conn: psycopg.Connection, buckets: list[tuple]) -> None:
    """(sender, address, holder, tokens, rate, capacity, paused for seconds or None, pause
    reason, pause message) of each sender, for status pages."""
    if buckets:
        columns = [list(column) for column in zip(*buckets)]
        for floats in columns[3:7]:  # one list may not mix int and float
            floats[:] = [None if value is None else float(value) for value in floats]
        conn.execute(_SAVE_BUCKETS, columns)

