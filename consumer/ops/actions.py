"""What an operator does to stored notifications: retry the ones that failed, cancel, prune.

Used by the CLI (`smsq retry`, `smsq cancel`, `smsq prune`) and the dashboard; all SQL of
these actions is here. Each action is one statement (prune: one per batch), so it cannot
race with a dispatcher: a row that a dispatcher holds (`processing`) is never touched.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

import psycopg

from consumer import pipeline
from consumer.pipeline import FINISHED, Status

RETRYABLE = (Status.ERRORED, Status.FAILED)
CANCELABLE = (Status.PENDING,)

_RETRY = """
WITH retried AS (
    UPDATE notification n
    SET status = 'pending', status_message = 'retried by an operator',
        retry_datetime = NULL, claimed_by = NULL, claimed_datetime = NULL,
        lease_expire_datetime = NULL
    FROM sms_notification s
    WHERE s.notification_id = n.id
      AND n.status = ANY(%(statuses)s)
      AND (%(ids)s::uuid[] IS NULL OR n.id = ANY(%(ids)s::uuid[]))
      AND (%(error_code)s::int IS NULL OR s.error_code = %(error_code)s::int)
      AND (%(since)s::timestamptz IS NULL OR n.created_datetime >= %(since)s::timestamptz)
    RETURNING n.id, n.sender, n.priority_rank, n.publish_datetime
), reset AS (
    -- a fresh set of attempts; the last error code stays until the next outcome
    UPDATE sms_notification s SET attempts = 0
    FROM retried WHERE s.notification_id = retried.id
)
SELECT id FROM retried
"""


_UNDELIVERED = """
SELECT n.id FROM notification n JOIN sms_notification s ON s.notification_id = n.id
WHERE n.status = 'sent' AND s.delivery_status IN ('undelivered', 'failed')
  AND (%(ids)s::uuid[] IS NULL OR n.id = ANY(%(ids)s::uuid[]))
  AND (%(error_code)s::int IS NULL OR s.error_code = %(error_code)s::int)
  AND (%(since)s::timestamptz IS NULL OR n.created_datetime >= %(since)s::timestamptz)
"""

_CANCEL = """
UPDATE notification
SET status = 'canceled', status_message = %(reason)s
WHERE id = ANY(%(ids)s::uuid[]) AND status = ANY(%(statuses)s)
RETURNING id
"""


def retry(
    conn: psycopg.Connection,
    *,
    ids: Sequence[uuid.UUID] | None = None,
    statuses: Sequence[str] = RETRYABLE,
    error_code: int | None = None,
    since: datetime | None = None,
) -> list[uuid.UUID]:
    """Return errored/failed notifications to pending; the ids that were retried."""
    unknown = set(statuses) - set(RETRYABLE)
    if unknown:
        raise ValueError(f"only {' or '.join(RETRYABLE)} notifications can be retried, "
                         f"not {', '.join(sorted(unknown))}")
    params = {"statuses": list(statuses), "ids": list(ids) if ids is not None else None,
              "error_code": error_code, "since": since}
    with conn.transaction():
        retried = [row[0] for row in conn.execute(_RETRY, params).fetchall()]
        pipeline.wake_for(conn, retried)
    return retried


def retry_undelivered(conn: psycopg.Connection, *, ids: Sequence[uuid.UUID] | None = None,
                      error_code: int | None = None,
                      since: datetime | None = None) -> list[uuid.UUID]:
    """An operator sends again messages whose delivery failed (never done automatically but
    for 30001 and 30022, which Twilio asks for); with a fresh set of attempts."""
    params = {"ids": list(ids) if ids is not None else None, "error_code": error_code,
              "since": since}
    with conn.transaction():
        chosen = [row[0] for row in conn.execute(_UNDELIVERED, params).fetchall()]
        return pipeline.send_again(
            conn, chosen, "sent again by an operator after a failed delivery",
            only_delivery=("undelivered", "failed"), fresh_attempts=True)


def cancel(conn: psycopg.Connection, ids: Sequence[uuid.UUID],
           reason: str = "canceled by an operator") -> list[uuid.UUID]:
    """Cancel pending notifications (scheduled or waiting); the ids that were canceled.

    A notification being sent (`processing`) or already finished cannot be canceled.
    """
    with conn.transaction():
        rows = conn.execute(_CANCEL, {"ids": list(ids), "statuses": list(CANCELABLE),
                                      "reason": reason}).fetchall()
    return [row[0] for row in rows]


def statuses_of(conn: psycopg.Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The status of each id; 'unknown' for an id not stored."""
    if not ids:
        return {}
    found: dict[uuid.UUID, str] = dict(conn.execute(
        "SELECT id, status FROM notification WHERE id = ANY(%s)", (list(ids),)).fetchall())
    return {i: found.get(i, "unknown") for i in ids}


# One batch: the oldest finished rows first (notification_finished_idx: the statuses are
# written out, as in the index, so that even a cached generic plan can use it), from where
# the last batch ended, so no batch walks the index entries of rows deleted before it.
# Locked rows are skipped and the status is checked again once locked, so a row an
# operator retries meanwhile stays. Their sms_notification and notification_event rows go
# with them.
_FINISHED_SQL = ", ".join(f"'{status}'" for status in FINISHED)  # as notification_finished_idx
_PRUNE_BATCH = f"""
WITH doomed AS (
    SELECT id FROM notification
    WHERE status IN ({_FINISHED_SQL}) AND created_datetime < %(before)s
      AND created_datetime >= %(after)s
    ORDER BY created_datetime
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM notification n USING doomed WHERE n.id = doomed.id
RETURNING n.created_datetime
"""

_COUNT_PRUNABLE = f"""
SELECT count(*) FROM notification
WHERE status IN ({_FINISHED_SQL}) AND created_datetime < %(before)s
"""


def prune(conn: psycopg.Connection, before: datetime, batch: int = 5_000,
          dry_run: bool = False) -> int:
    """Delete finished notifications created before `before`, a batch per transaction.

    Batches keep each transaction short (no long lock, no burst of WAL); with `dry_run`,
    only count them. Returns how many were (or would be) deleted.
    """
    params = {"before": before, "batch": batch, "after": datetime.min.replace(tzinfo=timezone.utc)}
    if dry_run:
        return pipeline.scalar(conn.execute(_COUNT_PRUNABLE, params))
    deleted = 0
    while True:
        with conn.transaction():
            ended_at = [row[0] for row in conn.execute(_PRUNE_BATCH, params)]
        if not ended_at:  # not merely a short batch: one that skipped locked rows is short
            return deleted
        deleted += len(ended_at)
        params["after"] = max(ended_at)
