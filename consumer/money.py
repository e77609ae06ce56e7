"""What sending costs: the spend the price sweep of `smsq dispatch` adds up in `spend_daily`,
as `smsq status`, the dashboard and the metrics read it. Contract: docs/contract.md.

Prices arrive from Twilio some time after sending (dispatch's price sweep); each one is added,
in the transaction that records it, to its UTC day of sending, sender, destination country
and currency. So these reads are cheap and pruning old messages never lowers them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from decimal import Decimal
from functools import lru_cache

import phonenumbers
import psycopg

UNKNOWN_COUNTRY = ""


@lru_cache(maxsize=65_536)
def country_of(number: str) -> str:
    """The ISO 3166 region of an E.164 number (`+14155550123` -> `US`), '' when unknown."""
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(number))
    except phonenumbers.NumberParseException:
        return UNKNOWN_COUNTRY
    return region if region and region != "ZZ" else UNKNOWN_COUNTRY


def add_spend(conn: psycopg.Connection,
              priced: Iterable[tuple[date, str, str, str, Decimal]]) -> None:
    """Add (day, sender, country, currency, price) of newly priced messages to spend_daily,
    in the caller's transaction."""
    totals: dict[tuple[date, str, str, str], list] = {}
    for day, sender, country, currency, price in priced:
        entry = totals.setdefault((day, sender, country, currency), [Decimal(0), 0])
        entry[0] += price
        entry[1] += 1
    if not totals:
        return
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO spend_daily (day, sender, country, currency, amount, messages)
               VALUES (%s, %s, %s, %s, %s, %s)
               ON CONFLICT (day, sender, country, currency) DO UPDATE
               SET amount = spend_daily.amount + excluded.amount,
                   messages = spend_daily.messages + excluded.messages""",
            [(*key, amount, count) for key, (amount, count) in totals.items()])


def spend_by_sender(conn: psycopg.Connection) -> list[dict]:
    """Today's and this month's spend (UTC) per sender and currency, and all of it."""
    rows = conn.execute(
        """SELECT sender, currency,
                  sum(amount) FILTER (WHERE day = (now() AT TIME ZONE 'UTC')::date),
                  sum(amount) FILTER (WHERE day >= date_trunc('month', now() AT TIME ZONE 'UTC')),
                  sum(amount), sum(messages)
           FROM spend_daily GROUP BY sender, currency ORDER BY sender, currency""").fetchall()
    return [{"sender": sender, "currency": currency, "today": _number(today),
             "month": _number(month), "total": _number(total), "messages": int(messages)}
            for sender, currency, today, month, total, messages in rows]


def spend_per_day(conn: psycopg.Connection, days: int = 30) -> list[tuple[date, str, float]]:
    """(UTC day, currency, amount) of the last `days` days, oldest first."""
    rows = conn.execute(
        """SELECT day, currency, sum(amount) FROM spend_daily
           WHERE day > (now() AT TIME ZONE 'UTC')::date - %s
           GROUP BY day, currency ORDER BY day, currency""", (days,)).fetchall()
    return [(day, currency, float(amount)) for day, currency, amount in rows]


def spend_by_country(conn: psycopg.Connection, days: int = 30) -> list[dict]:
    """Spend per destination country and currency over the last `days` days, dearest first."""
    rows = conn.execute(
        """SELECT country, currency, sum(amount), sum(messages) FROM spend_daily
           WHERE day > (now() AT TIME ZONE 'UTC')::date - %s
           GROUP BY country, currency ORDER BY sum(amount) DESC, country""", (days,)).fetchall()
    return [{"country": country or "unknown", "currency": currency, "amount": float(amount),
             "messages": int(messages)} for country, currency, amount, messages in rows]


def _number(value: Decimal | None) -> float:
    return float(value) if value is not None else 0.0
