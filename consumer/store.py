"""Every SQL statement of ingest and of the operator commands; the loops call only this.

The dispatcher's and the web app's statements live in their own store modules
(`dispatch_store.py`, `web/store.py`), next to nothing else.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg.rows import dict_row

from schemas.message import Notification

# Hosted media outlives its message by this much, so Twilio can fetch it after accepting.
MEDIA_TTL = timedelta(days=7)
MEDIA_ID_NAMESPACE = uuid.UUID("2b7e1c64-1f0a-5d5e-8c41-7a3e9d0f6b25")

_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS ingest_stage (
    id uuid, user_id text, title text, body text, url text, priority text,
    publish_datetime timestamptz, expire_datetime timestamptz, content_type text,
    object_id text, sender text, to_phone_number text, media_url text[],
    temporary_media_id uuid
) ON COMMIT DELETE ROWS
"""
_STAGE_COLUMNS = (
    "id, user_id, title, body, url, priority, publish_datetime, expire_datetime, "
    "content_type, object_id, sender, to_phone_number, media_url, temporary_media_id"
)
# Binary COPY: a third of the client's CPU of text COPY for these rows.
_STAGE_TYPES = (
    "uuid", "text", "text", "text", "text", "text", "timestamptz", "timestamptz", "text",
    "text", "text", "text", "text[]", "uuid",
)

# One statement moves the batch from the stage into both tables; ids already stored are
# skipped (ON CONFLICT), which is what makes a redelivered message harmless. A message
# without publish_datetime is due from the moment it is stored.
_INSERT_FROM_STAGE = """
WITH stage AS (
    SELECT DISTINCT ON (id) * FROM ingest_stage
), inserted AS (
    INSERT INTO notification (id, type, user_id, title, body, url, priority, publish_datetime,
                              expire_datetime, content_type, object_id, sender)
    SELECT id, 'sms', user_id, title, body, url, priority, coalesce(publish_datetime, now()),
           expire_datetime, content_type, object_id, sender
    FROM stage
    ON CONFLICT (id) DO NOTHING
    RETURNING id, sender, priority_rank, publish_datetime
), sms AS (
    INSERT INTO sms_notification (notification_id, to_phone_number, media_url, temporary_media_id)
    SELECT s.id, s.to_phone_number, s.media_url, s.temporary_media_id
    FROM stage s JOIN inserted USING (id)
)
SELECT count(*),
       -- wake the dispatchers of senders that have something due now
       (SELECT count(pg_notify('smsq_due', d.sender || ' ' || d.best_rank))
          FROM (SELECT sender, min(priority_rank) AS best_rank FROM inserted
                WHERE publish_datetime <= now() GROUP BY sender) d)
FROM inserted
"""

_INSERT_MEDIA = """
INSERT INTO sms_temporary_media (id, access_token, name, content_type, content, expire_datetime)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class IngestRow:
    """A validated message ready to be stored."""

    notification: Notification
    sender: str = ""
    fallback_id: uuid.UUID | None = None  # the id of a message that carries none

    @property
    def id(self) -> uuid.UUID:
        return self.notification.id or self.fallback_id


def prepare_ingest(conn: psycopg.Connection) -> None:
    """Create this connection's staging table (once per connection)."""
    conn.execute(_STAGE)
    conn.commit()


def insert_batch(conn: psycopg.Connection, rows: list[IngestRow]) -> int:
    """Store a batch in one transaction; return how many were new. Caller commits."""
    media_ids = _insert_media(conn, rows)
    with conn.cursor() as cur:
        with cur.copy(f"COPY ingest_stage ({_STAGE_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_STAGE_TYPES)
            for row in rows:
                copy.write_row(_stage_tuple(row, media_ids.get(row.id)))
        cur.execute(_INSERT_FROM_STAGE)
        inserted, _ = cur.fetchone()
    return inserted


def _stage_tuple(row: IngestRow, media_id: uuid.UUID | None) -> tuple:
    n = row.notification
    return (
        row.id, n.user_id, n.title, n.body, n.url, n.priority, n.publish_datetime,
        n.expire_datetime, n.content_type, n.object_id, row.sender,
        n.sms.to_phone_number, n.sms.media_url, media_id,
    )


def _insert_media(conn: psycopg.Connection, rows: list[IngestRow]) -> dict[uuid.UUID, uuid.UUID]:
    """Store inline media; ids derive from the notification id so a redelivery adds nothing."""
    media_ids = {}
    for row in rows:
        media = row.notification.sms.temporary_media
        if media is None:
            continue
        media_id = uuid.uuid5(MEDIA_ID_NAMESPACE, str(row.id))
        conn.execute(
            _INSERT_MEDIA,
            (media_id, secrets.token_urlsafe(24), media.name, media.content_type,
             media.content, _media_expiry(row.notification)),
        )
        media_ids[row.id] = media_id
    return media_ids


def _media_expiry(n: Notification) -> datetime:
    last_useful = n.expire_datetime or n.publish_datetime or datetime.now(timezone.utc)
    try:
        return last_useful + MEDIA_TTL
    except OverflowError:  # a date near year 9999: kept as long as Python can count
        return datetime.max.replace(tzinfo=timezone.utc)


def counts_by_status(conn: psycopg.Connection) -> list[tuple[str, str, int]]:
    """(status, priority, count), from the deltas the triggers of migration 0004 append."""
    return conn.execute(
        """SELECT status, priority, sum(delta)::bigint FROM notification_count_delta
           GROUP BY 1, 2 HAVING sum(delta) <> 0 ORDER BY 1, 2""").fetchall()


# Counted through the partial indexes on pending and processing rows: cheap at every scrape.
_BACKLOG = """
SELECT status, priority, count(*) FROM notification
WHERE status IN ('pending', 'processing') GROUP BY 1, 2
"""


def backlog_counts(conn: psycopg.Connection) -> list[tuple[str, str, int]]:
    """(status, priority, count) of the messages not yet done: pending and processing."""
    return conn.execute(_BACKLOG).fetchall()


def sender_buckets(conn: psycopg.Connection) -> list[dict]:
    """Each sender's token bucket as its dispatcher last wrote it (table dispatch_sender)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            """SELECT sender, address, holder, tokens, rate, capacity, updated_datetime,
                      extract(epoch FROM now() - updated_datetime)::float AS age_seconds
               FROM dispatch_sender ORDER BY sender"""
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
    age = conn.execute(_OLDEST_DUE).fetchone()[0]
    return float(age) if age is not None else None
