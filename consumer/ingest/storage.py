"""Every SQL statement of ingest: a batch of validated messages stored in one transaction.

The other stages' statements live in their own modules (`dispatch/claims.py`,
`serve/queries.py`, `ops/actions.py`); what they share is in `consumer/pipeline.py`.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg

from consumer import pipeline
from consumer.pipeline import LOWEST_RANK, PRIORITY_RANK
from schemas.message import LATEST_DATETIME, Notification

# Hosted media outlives its message by this much, so Twilio can fetch it after accepting.
MEDIA_TTL = timedelta(days=7)
MEDIA_ID_NAMESPACE = uuid.UUID("2b7e1c64-1f0a-5d5e-8c41-7a3e9d0f6b25")

# The common case, a batch of messages none of which is stored yet, goes in with one COPY
# per table: Postgres writes the rows in bulk, with no conflict check and no staging. The
# columns with a default (publish_datetime: now(), on the database's clock) are left out for
# the rows that do not set them.
_NOTIFICATION_COLUMNS = (
    "id", "user_id", "title", "body", "url", "priority", "expire_datetime", "content_type",
    "object_id", "sender",
)
_NOTIFICATION_TYPES = (
    "uuid", "text", "text", "text", "text", "text", "timestamptz", "text", "text", "text",
)
_SMS_COLUMNS = ("notification_id", "to_phone_number", "media_url", "temporary_media_id")
_SMS_TYPES = ("uuid", "text", "text[]", "uuid")


def _copy_statement(table: str, columns: tuple[str, ...]) -> str:
    return f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"


_COPY_DUE_NOW = _copy_statement("notification", _NOTIFICATION_COLUMNS)
_COPY_SCHEDULED = _copy_statement("notification", (*_NOTIFICATION_COLUMNS, "publish_datetime"))
_COPY_SMS = _copy_statement("sms_notification", _SMS_COLUMNS)

# A batch with an id already stored (a redelivery after a crash, a producer publishing
# twice) fails that COPY as a whole, and goes in through a staging table instead: one
# statement moves it into both tables, skipping the ids already stored (ON CONFLICT).
_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS ingest_stage (
    id uuid, user_id text, title text, body text, url text, priority text,
    expire_datetime timestamptz, content_type text, object_id text, sender text,
    publish_datetime timestamptz, to_phone_number text, media_url text[],
    temporary_media_id uuid
) ON COMMIT DELETE ROWS
"""
_COPY_STAGE = _copy_statement(
    "ingest_stage", (*_NOTIFICATION_COLUMNS, "publish_datetime", *_SMS_COLUMNS[1:]))
_STAGE_TYPES = (*_NOTIFICATION_TYPES, "timestamptz", *_SMS_TYPES[1:])

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
    RETURNING id
), sms AS (
    INSERT INTO sms_notification (notification_id, to_phone_number, media_url, temporary_media_id)
    SELECT s.id, s.to_phone_number, s.media_url, s.temporary_media_id
    FROM stage s JOIN inserted USING (id)
)
SELECT id FROM inserted
"""

# Wakes the dispatcher of each sender with new messages, and tells it the best priority
# among them: due now, it may take them before what it holds; scheduled, it learns when
# to wake.

_INSERT_MEDIA = """
INSERT INTO sms_temporary_media (id, access_token, name, content_type, content, expire_datetime)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
"""


@dataclass(slots=True)
class IngestRow:
    """A validated message ready to be stored."""

    notification: Notification
    id: uuid.UUID  # its own, or the one derived for a message that carries none
    sender: str = ""

    @classmethod
    def of(cls, notification: Notification, sender: str = "") -> IngestRow:
        """The row of a notification that carries its id."""
        assert notification.id is not None, "a notification without an id has no row"
        return cls(notification, notification.id, sender)


def prepare_ingest(conn: psycopg.Connection) -> None:
    """Create this connection's staging table (once per connection)."""
    conn.execute(_STAGE)
    conn.commit()


def insert_batch(conn: psycopg.Connection, rows: list[IngestRow]) -> list[uuid.UUID]:
    """Store a batch; return the ids that were new (the others were stored already).

    Commits, unless called inside a transaction (block), which the caller then commits.
    """
    try:
        with conn.transaction():
            return _store(conn, rows, _copy_new)
    except psycopg.errors.UniqueViolation:
        with conn.transaction():
            return _store(conn, rows, _insert_skipping_stored)


def _store(conn: psycopg.Connection, rows: list[IngestRow], insert) -> list[uuid.UUID]:
    media_ids = _insert_media(conn, rows)
    inserted = insert(conn, rows, media_ids)
    if len(inserted) < len(rows):  # only the new ones are news to a dispatcher
        new = set(inserted)
        rows = [row for row in rows if row.id in new]
    pipeline.wake_dispatchers(conn, _best_ranks(rows).items())
    return inserted


def _copy_new(conn: psycopg.Connection, rows: list[IngestRow],
              media_ids: dict[uuid.UUID, uuid.UUID]) -> list[uuid.UUID]:
    due_now, scheduled, sms = [], [], []
    for row in rows:  # one pass: this runs for every message stored
        values = _notification_tuple(row)
        publish_datetime = row.notification.publish_datetime
        if publish_datetime is None:
            due_now.append(values)
        else:
            scheduled.append((*values, publish_datetime))
        sms.append(_sms_tuple(row, media_ids.get(row.id) if media_ids else None))
    with conn.cursor() as cur:
        _copy(cur, _COPY_DUE_NOW, _NOTIFICATION_TYPES, due_now)
        _copy(cur, _COPY_SCHEDULED, (*_NOTIFICATION_TYPES, "timestamptz"), scheduled)
        _copy(cur, _COPY_SMS, _SMS_TYPES, sms)
    return [row.id for row in rows]


def _insert_skipping_stored(conn: psycopg.Connection, rows: list[IngestRow],
                            media_ids: dict[uuid.UUID, uuid.UUID]) -> list[uuid.UUID]:
    staged = [(*_notification_tuple(row), row.notification.publish_datetime,
               *_sms_tuple(row, media_ids.get(row.id))[1:]) for row in rows]
    with conn.cursor() as cur:
        _copy(cur, _COPY_STAGE, _STAGE_TYPES, staged)
        return [row[0] for row in cur.execute(_INSERT_FROM_STAGE)]


def _copy(cur: psycopg.Cursor, statement: str, types: tuple[str, ...], tuples: list[tuple]) -> None:
    if not tuples:
        return
    with cur.copy(statement) as copy:
        copy.set_types(types)
        for values in tuples:
            copy.write_row(values)


def _notification_tuple(row: IngestRow) -> tuple:
    n = row.notification
    return (row.id, n.user_id, n.title, n.body, n.url, n.priority, n.expire_datetime,
            n.content_type, n.object_id, row.sender)


def _sms_tuple(row: IngestRow, media_id: uuid.UUID | None) -> tuple:
    sms = row.notification.sms
    return (row.id, sms.to_phone_number, sms.media_url, media_id)


def _best_ranks(rows: list[IngestRow]) -> dict[str, int]:
    """The best priority rank of each sender of the batch."""
    best: dict[str, int] = {}
    for row in rows:
        rank = PRIORITY_RANK[row.notification.priority]
        if rank < best.get(row.sender, LOWEST_RANK + 1):
            best[row.sender] = rank
    return best


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
        return min(last_useful + MEDIA_TTL, LATEST_DATETIME)
    except OverflowError:  # a date near year 9999: kept as long as a message may be
        return LATEST_DATETIME
