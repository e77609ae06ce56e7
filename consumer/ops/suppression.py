"""The suppression list: numbers that receive nothing (README "Guard rails").

Used by `smsq suppress`, the dashboard and the inbound webhook of `smsq serve`; dispatch
reads the table in its claim and adds to it on a 21610 answer (consumer/dispatch/claims.py).
Numbers are stored in E.164, as ingest stores recipients, so a lookup is one index probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg.rows import dict_row

from consumer.pipeline import SuppressionReason
from schemas.message import normalise_phone_number

_ADD = """
INSERT INTO suppressed_number (phone_number, reason, detail)
SELECT number, %(reason)s, %(detail)s FROM unnest(%(numbers)s::text[]) AS number
ON CONFLICT (phone_number) DO NOTHING
RETURNING phone_number
"""

_REMOVE = """
DELETE FROM suppressed_number
WHERE phone_number = ANY(%(numbers)s::text[])
  AND (%(reasons)s::text[] IS NULL OR reason = ANY(%(reasons)s::text[]))
RETURNING phone_number
"""

_LIST = """
SELECT phone_number, reason, detail, created_datetime FROM suppressed_number
WHERE (%(number)s::text IS NULL OR phone_number = %(number)s)
ORDER BY created_datetime DESC, phone_number
LIMIT %(limit)s
"""


def as_e164(text: str, default_region: str | None) -> str | None:
    """A number as the list stores it, or None when it is not a valid phone number."""
    try:
        return normalise_phone_number(text.strip(), default_region)
    except ValueError:
        return None


def add(conn: psycopg.Connection, numbers: Sequence[str], reason: SuppressionReason,
        detail: str = "") -> list[str]:
    """Put E.164 numbers on the list; those that were not on it already."""
    rows = conn.execute(_ADD, {"numbers": list(numbers), "reason": reason.value,
                               "detail": detail[:500]}).fetchall()
    return [row[0] for row in rows]


def remove(conn: psycopg.Connection, numbers: Sequence[str],
           reasons: Sequence[SuppressionReason] | None = None) -> list[str]:
    """Take E.164 numbers off the list (only those put there for `reasons`, when given);
    those that were on it."""
    rows = conn.execute(_REMOVE, {"numbers": list(numbers), "reasons": None if reasons is None
                                  else [r.value for r in reasons]}).fetchall()
    return [row[0] for row in rows]


def listed(conn: psycopg.Connection, number: str | None = None, limit: int = 1000) -> list[dict]:
    """The newest entries first (one number's, when given)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_LIST, {"number": number, "limit": limit}).fetchall()
