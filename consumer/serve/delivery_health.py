"""Delivery health, from the status callbacks: do the messages of the last hour arrive?

Every SMSQ_DELIVERY_CHECK_SECONDS `smsq serve` looks at the messages sent in the last hour
(a SID sent again counts once for each sending), per sender and per destination country:

- the failure share: undelivered or failed among those with a final receipt; above
  SMSQ_ALERT_FAILURE_RATE over at least MIN_MESSAGES finished ones, `failure_rate`;
- slow receipts: sent more than SMSQ_SLOW_RECEIPT_MINUTES ago without a final receipt; above
  SLOW_SHARE of at least MIN_MESSAGES sent, `slow_receipts`;
- any 30007 (the carrier filtered it as spam): `carrier_filtering`, the sender's reputation.

An alert is an episode: a row in `delivery_alert` from the check that finds it to the first
that does not. Whichever serve inserts the row logs the one error of the episode; its
clearing is logged once too. The gauge `smsq_delivery_alert` and the dashboard's banner
show the alerts in force.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import psycopg

from consumer import money
from consumer.metrics import DELIVERY_ALERT, DELIVERY_FAILURE_RATIO, SLOW_RECEIPT_RATIO
from consumer.settings import Settings

log = logging.getLogger(__name__)

MIN_MESSAGES = 20
SLOW_SHARE = 0.1
CARRIER_FILTERED = 30007

# One row per (sender, number, sending) of the last hour, folded per number in SQL.
_LAST_HOUR = """
WITH sendings AS (
    SELECT n.sender, s.to_phone_number AS number, s.delivery_status, s.error_code,
           n.sent_datetime
    FROM notification n JOIN sms_notification s ON s.notification_id = n.id
    WHERE n.sent_datetime > now() - interval '1 hour' AND n.status = 'sent'
    UNION ALL
    SELECT n.sender, s.to_phone_number, t.delivery_status, t.error_code, t.sent_datetime
    FROM twilio_superseded_sid t JOIN notification n ON n.id = t.notification_id
    JOIN sms_notification s ON s.notification_id = t.notification_id
    WHERE t.sent_datetime > now() - interval '1 hour'
)
SELECT sender, number, count(*),
       count(*) FILTER (WHERE delivery_status IN ('delivered', 'undelivered', 'failed')),
       count(*) FILTER (WHERE delivery_status = 'delivered'),
       count(*) FILTER (WHERE delivery_status IS DISTINCT FROM 'delivered'
                          AND delivery_status IS DISTINCT FROM 'undelivered'
                          AND delivery_status IS DISTINCT FROM 'failed'
                          AND sent_datetime < now() - make_interval(secs => %(slow)s * 60)),
       count(*) FILTER (WHERE error_code = %(filtered)s)
FROM sendings GROUP BY sender, number
"""


@dataclass
class Tally:
    sent: int = 0
    finished: int = 0
    delivered: int = 0
    slow: int = 0
    filtered: int = 0

    def add(self, sent: int, finished: int, delivered: int, slow: int, filtered: int) -> None:
        self.sent += sent
        self.finished += finished
        self.delivered += delivered
        self.slow += slow
        self.filtered += filtered

    @property
    def failure_share(self) -> float:
        return (self.finished - self.delivered) / self.finished if self.finished else 0.0

    @property
    def slow_share(self) -> float:
        return self.slow / self.sent if self.sent else 0.0


@dataclass(frozen=True)
class Finding:
    scope: str  # sender or country
    key: str
    reason: str  # failure_rate, slow_receipts, carrier_filtering
    value: float
    detail: str


def tallies(conn: psycopg.Connection, slow_minutes: float) -> dict[tuple[str, str], Tally]:
    """(scope, key) -> the last hour's tally, per sender and per destination country."""
    found: dict[tuple[str, str], Tally] = defaultdict(Tally)
    rows = conn.execute(_LAST_HOUR, {"slow": slow_minutes, "filtered": CARRIER_FILTERED})
    for sender, number, *counts in rows.fetchall():
        found[("sender", sender)].add(*counts)
        found[("country", money.country_of(number))].add(*counts)
    return found


def findings(tallied: dict[tuple[str, str], Tally], failure_rate: float) -> list[Finding]:
    """What is wrong, by the rules of the module's docstring (pure)."""
    found = []
    for (scope, key), tally in sorted(tallied.items()):
        if tally.finished >= MIN_MESSAGES and tally.failure_share > failure_rate:
            found.append(Finding(scope, key, "failure_rate", tally.failure_share,
                                 f"{tally.finished - tally.delivered} of {tally.finished} "
                                 "finished messages not delivered in the last hour"))
        if tally.sent >= MIN_MESSAGES and tally.slow_share > SLOW_SHARE:
            found.append(Finding(scope, key, "slow_receipts", tally.slow_share,
                                 f"{tally.slow} of {tally.sent} messages of the last hour "
                                 "without a final receipt"))
        if tally.filtered:
            found.append(Finding(scope, key, "carrier_filtering", tally.filtered,
                                 f"{tally.filtered} message(s) filtered by the carrier as "
                                 "spam (30007) in the last hour"))
    return found


_RAISE = """
INSERT INTO delivery_alert (scope, key, reason, value, detail) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (scope, key, reason) DO UPDATE
SET value = excluded.value, detail = excluded.detail, updated_datetime = now()
RETURNING xmax = 0
"""


def check(conn: psycopg.Connection, settings: Settings) -> list[Finding]:
    """One check: record the alerts in force, log the episodes that start or end."""
    tallied = tallies(conn, settings.smsq_slow_receipt_minutes)
    found = findings(tallied, settings.smsq_alert_failure_rate)
    with conn.transaction():
        for finding in found:
            started = conn.execute(_RAISE, (finding.scope, finding.key, finding.reason,
                                            finding.value, finding.detail)).fetchone()
            if started and started[0]:
                log.error("delivery alert: " + finding.detail, extra={
                    "action": "delivery_alert_raised", "scope": finding.scope,
                    "key": finding.key or "default", "reason": finding.reason,
                    "value": round(finding.value, 4)})
        cleared = _clear_others(conn, found)
    _export(tallied, found, cleared)
    return found


def _clear_others(conn: psycopg.Connection, found: list[Finding]) -> list[tuple[str, str, str]]:
    keep = [f"{f.scope}\x1f{f.key}\x1f{f.reason}" for f in found]
    cleared = conn.execute(
        """DELETE FROM delivery_alert
           WHERE NOT (scope || chr(31) || key || chr(31) || reason = ANY(%s::text[]))
           RETURNING scope, key, reason""", (keep,)).fetchall()
    for scope, key, reason in cleared:
        log.info("delivery alert cleared", extra={
            "action": "delivery_alert_cleared", "scope": scope, "key": key or "default",
            "reason": reason})
    return cleared


def _export(tallied: dict[tuple[str, str], Tally], found: list[Finding],
            cleared: list[tuple[str, str, str]]) -> None:
    for (scope, key), tally in tallied.items():
        if scope == "sender":
            DELIVERY_FAILURE_RATIO.labels(key or "default").set(tally.failure_share)
            SLOW_RECEIPT_RATIO.labels(key or "default").set(tally.slow_share)
    for scope, key, reason in cleared:
        DELIVERY_ALERT.labels(scope, key or "default", reason).set(0)
    for finding in found:
        DELIVERY_ALERT.labels(finding.scope, finding.key or "default", finding.reason).set(1)


def alerts_in_force(conn: psycopg.Connection) -> list[dict]:
    """The dashboard's banner: every alert of an episode not over yet."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("""SELECT scope, key, reason, value, detail, started_datetime
                              FROM delivery_alert ORDER BY started_datetime""").fetchall()
