"""The price sweep of `smsq dispatch`: what each sent message cost, once Twilio says.

Twilio leaves a message's `price` null at first and fills it in later (minutes, at times
hours). Every SMSQ_PRICE_SWEEP_SECONDS one dispatcher (a session-level advisory lock on a
connection of its own; the others skip that round) reads the prices of the messages sent
since the oldest still unpriced one, through the Messages list page by page, and records
them: on the notification, or on a SID it superseded (a message sent twice costs both), and
added to `spend_daily` in the same transaction, so each price counts once. A message still
unpriced a day after sending is given up on. No transaction is open during a Twilio request.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

import psycopg
import urllib3
from twilio.base.exceptions import TwilioException

from consumer import money
from consumer.dispatch.twilio_client import PRICE_PAGE, Priced, TwilioSender
from consumer.logs import error_text
from consumer.settings import Settings
from consumer.signals import StopSignal

log = logging.getLogger(__name__)

# pg_try_advisory_lock(classid, objid): smsq's class (as the senders' locks), then "price".
SWEEP_LOCK = (0x736D7371, 0x70726963)
GIVE_UP_AFTER = "1 day"

_UNPRICED = f"""
SELECT s.twilio_sid, n.sent_datetime FROM notification n
JOIN sms_notification s ON s.notification_id = n.id
WHERE n.sent_datetime > now() - interval '{GIVE_UP_AFTER}' AND n.status = 'sent'
  AND s.twilio_sid IS NOT NULL AND s.price IS NULL
  AND s.delivery_status IS DISTINCT FROM 'failed'   -- never sent: never charged
UNION ALL
SELECT sid, sent_datetime FROM twilio_superseded_sid
WHERE sent_datetime > now() - interval '{GIVE_UP_AFTER}' AND price IS NULL
  AND delivery_status IS DISTINCT FROM 'failed'
"""

# Only rows still unpriced take a price: a concurrent or repeated sweep adds nothing twice.
_PRICE_CURRENT = """
WITH priced(sid, price, unit) AS (SELECT * FROM unnest(%(sids)s::text[], %(prices)s::numeric[],
                                                        %(units)s::text[]))
UPDATE sms_notification s SET price = p.price, price_unit = p.unit
FROM priced p, notification n
WHERE s.twilio_sid = p.sid AND s.price IS NULL AND n.id = s.notification_id
RETURNING n.sent_datetime, n.sender, s.to_phone_number, p.unit, p.price
"""
_PRICE_SUPERSEDED = """
WITH priced(sid, price, unit) AS (SELECT * FROM unnest(%(sids)s::text[], %(prices)s::numeric[],
                                                        %(units)s::text[]))
UPDATE twilio_superseded_sid t SET price = p.price, price_unit = p.unit
FROM priced p, notification n, sms_notification s
WHERE t.sid = p.sid AND t.price IS NULL AND n.id = t.notification_id
  AND s.notification_id = t.notification_id
RETURNING t.sent_datetime, n.sender, s.to_phone_number, p.unit, p.price
"""


def unpriced(conn: psycopg.Connection) -> tuple[set[str], datetime | None]:
    """The SIDs of the messages whose price is still to be read, and the oldest's send time."""
    waiting: set[str] = set()
    oldest = None
    for sid, sent in conn.execute(_UNPRICED):  # row by row: a day may hold many
        waiting.add(sid)
        oldest = sent if oldest is None else min(oldest, sent)
    return waiting, oldest


def record_prices(conn: psycopg.Connection, priced: list[Priced]) -> int:
    """Record the prices and add them to the spend, in one transaction; how many were new."""
    params = {"sids": [p.sid for p in priced], "prices": [p.price for p in priced],
              "units": [p.unit for p in priced]}
    with conn.transaction():
        rows = (conn.execute(_PRICE_CURRENT, params).fetchall()
                + conn.execute(_PRICE_SUPERSEDED, params).fetchall())
        money.add_spend(conn, [
            (sent.astimezone(timezone.utc).date(), sender, money.country_of(number), unit,
             price) for sent, sender, number, unit, price in rows])
    return len(rows)


def sweep(conn: psycopg.Connection, twilio: TwilioSender, batch: int = PRICE_PAGE) -> int:
    """One round: read the prices Twilio now has for our unpriced messages; how many. They
    are recorded `batch` at a time, so a sweep after a busy day holds a page, not the day."""
    waiting, oldest = unpriced(conn)
    if oldest is None:
        return 0
    recorded, found = 0, []
    for priced in twilio.prices_sent_since(oldest.astimezone(timezone.utc).date()):
        if priced.sid not in waiting:
            continue
        waiting.discard(priced.sid)
        found.append(priced)
        if len(found) == batch or not waiting:
            recorded += record_prices(conn, found)
            found = []
        if not waiting:
            break  # the rest of the list is older messages, priced already
    return recorded + (record_prices(conn, found) if found else 0)


class PriceSweeper(threading.Thread):
    """Sweeps every SMSQ_PRICE_SWEEP_SECONDS while this dispatcher runs."""

    def __init__(self, settings: Settings, twilio: TwilioSender, stop: StopSignal) -> None:
        super().__init__(name="price-sweep", daemon=True)
        self.settings = settings
        self.twilio = twilio
        self.stop = stop

    def run(self) -> None:
        while not self.stop.wait(self.settings.smsq_price_sweep_seconds):
            try:
                self.sweep_once()
            except (psycopg.Error, urllib3.exceptions.HTTPError, TwilioException) as exc:
                log.warning("price sweep failed, tried again next round", extra={
                    "action": "price_sweep_failed", "error": error_text(exc)})

    def sweep_once(self) -> int | None:
        """Prices recorded, or None when another dispatcher sweeps this round."""
        with psycopg.connect(self.settings.database_dsn, autocommit=True,
                             application_name="smsq dispatch prices") as conn:
            locked = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", SWEEP_LOCK).fetchone()
            if not (locked and locked[0]):
                return None
            recorded = sweep(conn, self.twilio)
        if recorded:
            log.info("prices recorded", extra={"action": "prices_recorded", "count": recorded})
        return recorded
