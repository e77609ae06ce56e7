"""Every SQL statement of `smsq serve`: status callbacks, hosted media, the dashboard.

Each dashboard query is written to use an index, so the page stays fast with millions of
rows (see bench/web_dashboard.py for the plans and timings on a million notifications).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg.abc import Params
from psycopg.rows import dict_row

from consumer.pipeline import scalar

# ---------------------------------------------------------------- status callbacks


def lock_delivery_status(conn: psycopg.Connection,
                         twilio_sid: str) -> tuple[uuid.UUID, str | None, int] | None:
    """(notification id, delivery_status, attempts) of the message with this SID, locked;
    None if unknown."""
    return conn.execute(
        """SELECT notification_id, delivery_status, attempts FROM sms_notification
           WHERE twilio_sid = %s FOR UPDATE""", (twilio_sid,)).fetchone()


def superseded_by(conn: psycopg.Connection, twilio_sid: str) -> uuid.UUID | None:
    """The notification that had this SID before it was sent again, if any."""
    row = conn.execute("SELECT notification_id FROM twilio_superseded_sid WHERE sid = %s",
                       (twilio_sid,)).fetchone()
    return row[0] if row else None


# Only a notification still waiting for its outcome (processing, or put back to pending by a
# reconciliation that did not see the message yet) and without a SID takes one this way.
_ADOPT_SID = """
WITH n AS (
    UPDATE notification n
    SET status = 'sent', sent_datetime = now(), status_message = '',
        claimed_by = NULL, claimed_datetime = NULL, lease_expire_datetime = NULL,
        retry_datetime = NULL
    FROM sms_notification s
    WHERE n.id = %(id)s AND s.notification_id = n.id AND s.twilio_sid IS NULL
      AND n.status IN ('processing', 'pending')
    RETURNING n.id
)
UPDATE sms_notification s SET twilio_sid = %(sid)s, reconcile_checks = 0
FROM n WHERE s.notification_id = n.id
RETURNING s.notification_id, s.delivery_status, s.attempts
"""


def adopt_sid(conn: psycopg.Connection, notification_id: uuid.UUID,
              twilio_sid: str) -> tuple[uuid.UUID, str | None, int] | None:
    """Record `twilio_sid` as the message of a notification whose create answer was lost;
    (id, delivery status, attempts) as lock_delivery_status, or None when it cannot be."""
    return conn.execute(_ADOPT_SID, {"id": notification_id, "sid": twilio_sid}).fetchone()


def set_delivery_status(conn: psycopg.Connection, notification_id: uuid.UUID, status: str,
                        error_code: int | None) -> None:
    """Record a delivery status; an error code, once known, is kept when the next has none."""
    conn.execute(
        """UPDATE sms_notification
           SET delivery_status = %s, error_code = coalesce(%s, error_code)
           WHERE notification_id = %s""", (status, error_code, notification_id))


def park_early_receipt(conn: psycopg.Connection, twilio_sid: str, status: str,
                       error_code: int | None) -> None:
    conn.execute(
        """INSERT INTO delivery_receipt_early (twilio_sid, delivery_status, error_code)
           VALUES (%s, %s, %s)
           ON CONFLICT (twilio_sid, delivery_status, coalesce(error_code, -1)) DO NOTHING""",
        (twilio_sid, status, error_code))


def early_receipts_now_known(conn: psycopg.Connection, limit: int = 500) -> list[tuple]:
    """(id, sid, delivery status, error code) of parked receipts whose SID is now recorded."""
    return conn.execute(
        """SELECT r.id, r.twilio_sid, r.delivery_status, r.error_code
           FROM delivery_receipt_early r
           WHERE EXISTS (SELECT 1 FROM sms_notification s WHERE s.twilio_sid = r.twilio_sid)
           ORDER BY r.id LIMIT %s""", (limit,)).fetchall()


def forget_early_receipts(conn: psycopg.Connection, ids: list[int],
                          older_than_seconds: float) -> int:
    """Drop the applied ones, and those whose SID never showed up; how many were dropped."""
    return conn.execute(
        """DELETE FROM delivery_receipt_early
           WHERE id = ANY(%s) OR received_datetime < now() - make_interval(secs => %s)""",
        (ids, older_than_seconds)).rowcount


# ---------------------------------------------------------------- hosted media

# Media stays while a notification using it may still be sent, and for a grace period after
# it was sent, because Twilio fetches the URL after accepting the message.
_MEDIA_IN_USE = """EXISTS (
    SELECT 1 FROM sms_notification s JOIN notification n ON n.id = s.notification_id
    WHERE s.temporary_media_id = m.id
      AND (n.status IN ('pending', 'processing')
           OR n.sent_datetime > now() - make_interval(secs => %(grace_seconds)s)))"""


@dataclass(frozen=True)
class Media:
    name: str
    content_type: str
    content: bytes


def servable_media(conn: psycopg.Connection, token: str, grace_seconds: float) -> Media | None:
    """The media behind `token`, unless it expired (exactly what the cleanup may delete)."""
    row = conn.execute(
        f"""SELECT name, content_type, content FROM sms_temporary_media m
            WHERE access_token = %(token)s
              AND (expire_datetime > now() OR {_MEDIA_IN_USE})""",
        {"token": token, "grace_seconds": grace_seconds}).fetchone()
    return Media(row[0], row[1], bytes(row[2])) if row else None


def delete_expired_media(conn: psycopg.Connection, grace_seconds: float, batch: int = 500) -> int:
    """Delete up to `batch` expired media rows nobody needs any more; how many were deleted."""
    cur = conn.execute(
        f"""DELETE FROM sms_temporary_media WHERE id IN (
                SELECT id FROM sms_temporary_media m
                WHERE expire_datetime <= now() AND NOT {_MEDIA_IN_USE}
                ORDER BY expire_datetime LIMIT %(batch)s
                FOR UPDATE SKIP LOCKED)""",
        {"grace_seconds": grace_seconds, "batch": batch})
    return cur.rowcount


# ---------------------------------------------------------------- dashboard


def sends_per_minute(conn: psycopg.Connection,
                     minutes: int = 60) -> tuple[datetime, list[tuple[datetime, int]]]:
    """(this minute, [(minute, messages sent)]) over the last `minutes` minutes, this one
    included."""
    this_minute = scalar(conn.execute("SELECT date_trunc('minute', now())"))
    # A constant bound (not an expression of now()) lets the planner see how few rows it
    # covers and use notification_sent_idx instead of reading the table.
    rows = conn.execute(
        """SELECT date_trunc('minute', sent_datetime), count(*) FROM notification
           WHERE sent_datetime >= %s GROUP BY 1""",
        (this_minute - timedelta(minutes=minutes - 1),)).fetchall()
    return this_minute, rows


def processing_past_lease(conn: psycopg.Connection) -> int:
    """Rows a dispatcher claimed and has not finished in time (reconciliation pending)."""
    return scalar(conn.execute(
        """SELECT count(*) FROM notification
           WHERE status = 'processing' AND lease_expire_datetime < now()"""))


_ERROR_VALUES = "('errored', 'failed', 'undelivered')"  # as in notification_event_error_idx
_ERROR_CODE = "coalesce(e.error_code, s.error_code)"


def errors_by_code(conn: psycopg.Connection, hours: int = 24) -> list[dict]:
    """Errors of the last `hours` (sending and delivery), grouped by Twilio error code."""
    return _dicts(
        conn, f"""SELECT {_ERROR_CODE} AS code, count(*) AS events,
                   count(DISTINCT e.notification_id) AS notifications,
                   max(e.created_datetime) AS last_seen,
                   (array_agg(e.message ORDER BY e.id DESC)
                       FILTER (WHERE e.message <> ''))[1] AS sample_message
            FROM notification_event e
            JOIN sms_notification s ON s.notification_id = e.notification_id
            WHERE e.new_value IN {_ERROR_VALUES}
              AND e.created_datetime >= now() - make_interval(hours => %s)
            GROUP BY 1 ORDER BY events DESC, code LIMIT 30""", (hours,))


def recent_errors(conn: psycopg.Connection, hours: int, code: int | None,
                  without_code: bool, limit: int = 200) -> list[dict]:
    """The latest error events (optionally of one code, or of none) with their notification."""
    return _dicts(
        conn, f"""SELECT e.created_datetime, e.field, e.new_value, {_ERROR_CODE} AS code,
                   n.id, n.status, n.priority, n.status_message, n.created_datetime AS created,
                   s.to_phone_number, s.delivery_status
            FROM notification_event e
            JOIN notification n ON n.id = e.notification_id
            JOIN sms_notification s ON s.notification_id = e.notification_id
            WHERE e.new_value IN {_ERROR_VALUES}
              AND e.created_datetime >= now() - make_interval(hours => %(hours)s)
              AND (NOT %(filtered)s OR {_ERROR_CODE} IS NOT DISTINCT FROM %(code)s::int)
            ORDER BY e.created_datetime DESC LIMIT %(limit)s""",
        {"hours": hours, "filtered": code is not None or without_code, "code": code,
         "limit": limit})


_NOTIFICATION_COLUMNS = """
    n.id, n.status, n.status_message, n.priority, n.title, n.body, n.url, n.user_id,
    n.publish_datetime, n.expire_datetime, n.sent_datetime, n.created_datetime,
    n.content_type, n.object_id, n.sender, n.retry_datetime, n.claimed_by,
    n.lease_expire_datetime, s.to_phone_number, s.media_url, s.twilio_sid, s.segments,
    s.attempts, s.error_code, s.delivery_status, s.temporary_media_id
"""
_FROM_NOTIFICATION = "FROM notification n JOIN sms_notification s ON s.notification_id = n.id"


def notification(conn: psycopg.Connection, notification_id: uuid.UUID) -> dict | None:
    found = _dicts(conn, f"SELECT {_NOTIFICATION_COLUMNS} {_FROM_NOTIFICATION} WHERE n.id = %s",
                   (notification_id,))
    return found[0] if found else None


def notifications_with_id_prefix(conn: psycopg.Connection, hex_prefix: str,
                                 limit: int = 100) -> list[dict]:
    """Notifications whose id starts with these hex digits: a range of the primary key."""
    low, high = (uuid.UUID(hex_prefix.ljust(32, fill)) for fill in "0f")
    return _dicts(
        conn, f"""SELECT {_NOTIFICATION_COLUMNS} {_FROM_NOTIFICATION}
                  WHERE n.id BETWEEN %s AND %s ORDER BY n.id LIMIT %s""",
        (low, high, limit))


def notifications_by_sid(conn: psycopg.Connection, twilio_sid: str) -> list[dict]:
    return _dicts(
        conn, f"SELECT {_NOTIFICATION_COLUMNS} {_FROM_NOTIFICATION} WHERE s.twilio_sid = %s",
        (twilio_sid,))


def notifications_to(conn: psycopg.Connection, phone_number: str, limit: int = 100) -> list[dict]:
    """The latest notifications to one number (sms_notification_to_idx, then by primary key)."""
    return _dicts(
        conn, f"""SELECT {_NOTIFICATION_COLUMNS} {_FROM_NOTIFICATION}
                  WHERE s.to_phone_number = %s ORDER BY n.created_datetime DESC LIMIT %s""",
        (phone_number, limit))


def history(conn: psycopg.Connection, notification_id: uuid.UUID) -> list[dict]:
    return _dicts(
        conn, """SELECT created_datetime, field, old_value, new_value, message, error_code
                 FROM notification_event WHERE notification_id = %s ORDER BY id""",
        (notification_id,))


def media_of(conn: psycopg.Connection, media_id: uuid.UUID) -> dict | None:
    found = _dicts(
        conn, """SELECT name, content_type, octet_length(content) AS size, access_token,
                        expire_datetime FROM sms_temporary_media WHERE id = %s""",
        (media_id,))
    return found[0] if found else None


# ---------------------------------------------------------------- dashboard sessions


def session_key(conn: psycopg.Connection) -> tuple[bytes, bytes, bytes] | None:
    """(secret, password salt, password check) of the dashboard's session key, if made yet."""
    row = conn.execute("""SELECT secret, password_salt, password_check FROM dashboard_key
                          WHERE id = 1""").fetchone()
    return (bytes(row[0]), bytes(row[1]), bytes(row[2])) if row else None


def create_session_key(conn: psycopg.Connection, secret: bytes, salt: bytes,
                       check: bytes) -> None:
    """The first key; a copy that made one at the same moment wins, and this does nothing."""
    conn.execute(
        """INSERT INTO dashboard_key (secret, password_salt, password_check)
           VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING""", (secret, salt, check))


def replace_session_key(conn: psycopg.Connection, secret: bytes, salt: bytes | None = None,
                        check: bytes | None = None) -> int:
    """A new key (and password check, if given); every session ends with the old key. How
    many session rows there were."""
    conn.execute(
        """UPDATE dashboard_key SET secret = %s, password_salt = coalesce(%s, password_salt),
                  password_check = coalesce(%s, password_check), rotated_datetime = now()
           WHERE id = 1""", (secret, salt, check))
    return conn.execute("DELETE FROM dashboard_session").rowcount


def start_session(conn: psycopg.Connection, session_id: str, user: str,
                  seconds: float) -> None:
    conn.execute(
        """INSERT INTO dashboard_session (id, user_name, expire_datetime)
           VALUES (%s, %s, now() + make_interval(secs => %s))""", (session_id, user, seconds))
    conn.execute("DELETE FROM dashboard_session WHERE expire_datetime < now()")


def session_is_live(conn: psycopg.Connection, session_id: str, user: str) -> bool:
    return conn.execute(
        """SELECT 1 FROM dashboard_session
           WHERE id = %s AND user_name = %s AND expire_datetime > now()""",
        (session_id, user)).fetchone() is not None


def end_session(conn: psycopg.Connection, session_id: str) -> None:
    conn.execute("DELETE FROM dashboard_session WHERE id = %s", (session_id,))


def _dicts(conn: psycopg.Connection, query: str, params: Params | None = None) -> list[dict]:
    """Rows by column name, without changing the pooled connection's row factory."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()
