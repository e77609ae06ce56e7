"""The guard rails' SQL of `smsq dispatch`: places under SMSQ_RECIPIENT_LIMIT, segments sent
today for SMSQ_DAILY_SEGMENT_LIMIT, and what the guards stopped. (The suppression list is
read by the claim itself and fed by recorded 21610 answers: claims.py.)
"""

from __future__ import annotations

from uuid import UUID

import psycopg

from consumer.dispatch.claims import ClaimedRow
from consumer.settings import RecipientLimit

# First key of the transaction-level advisory locks that serialise the places taken for one
# recipient (the second is hashtext(number)): two dispatchers sending to one number (its rows
# stored under two senders) cannot both take its last place.
RECIPIENT_LOCK_NAMESPACE = 0x736D_7372

_LOCK_RECIPIENTS = """
SELECT pg_advisory_xact_lock(%(namespace)s, hashtext(number))
FROM (SELECT DISTINCT number FROM unnest(%(numbers)s::text[]) AS number ORDER BY number) ordered
"""

# Requests to one number within each window, counted up to that window's limit: an index
# range of at most `sends` rows, however many the table holds.
_RECENT_SENDS = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM recipient_send
                              WHERE phone_number = %(number)s
                                AND sent_datetime > now() - make_interval(secs => w.seconds)
                              LIMIT w.sends) recent)
FROM unnest(%(seconds)s::float8[], %(sends)s::int[]) WITH ORDINALITY AS w(seconds, sends, i)
ORDER BY w.i
"""


def reserve_recipients(conn: psycopg.Connection, rows: list[ClaimedRow],
                       limits: tuple[RecipientLimit, ...]) -> dict[UUID, RecipientLimit]:
    """Take a place under every limit for each row's recipient, just before its request; the
    rows that found none, with the limit they would pass (they must not be sent).

    One transaction, holding a lock of each number (taken in order, so two dispatchers never
    deadlock): counting and taking the place cannot interleave with another dispatcher's.
    """
    capped: dict[UUID, RecipientLimit] = {}
    windows = {"seconds": [limit.seconds for limit in limits],
               "sends": [limit.sends for limit in limits]}
    with conn.transaction():
        conn.execute(_LOCK_RECIPIENTS, {"namespace": RECIPIENT_LOCK_NAMESPACE,
                                        "numbers": [row.to_phone_number for row in rows]})
        for row in rows:
            counts = [r[0] for r in conn.execute(
                _RECENT_SENDS, {"number": row.to_phone_number, **windows}).fetchall()]
            full = next((limit for limit, count in zip(limits, counts)
                         if count >= limit.sends), None)
            if full is not None:
                capped[row.id] = full
            else:
                conn.execute("INSERT INTO recipient_send (notification_id, phone_number) "
                             "VALUES (%s, %s)", (row.id, row.to_phone_number))
    return capped


def forget_recipient_sends(conn: psycopg.Connection, older_than_seconds: float) -> None:
    """Places older than the longest window count no more."""
    conn.execute("DELETE FROM recipient_send "
                 "WHERE sent_datetime < now() - make_interval(secs => %s)", (older_than_seconds,))


def segments_today(conn: psycopg.Connection, sender: str) -> float:
    """Segments Twilio accepted from `sender` this UTC day (every dispatcher's)."""
    row = conn.execute("SELECT segments FROM sender_day_segments "
                       "WHERE sender = %s AND day = (now() AT TIME ZONE 'UTC')::date",
                       (sender,)).fetchone()
    return float(row[0]) if row else 0.0
