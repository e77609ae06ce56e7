"""What a carrier's error in a status callback means for the message and its number.

Twilio passes on, in `ErrorCode` of an `undelivered` / `failed` callback, why the carrier did
not deliver a message it had accepted (https://www.twilio.com/docs/api/errors):

- 30003 (unreachable handset: off, out of coverage) and 30008 (unknown carrier error) may pass:
  the message is sent again, once, 10 minutes later, if that is before its expire_datetime;
- 30005 (unknown number) and 30006 (landline, or a carrier that cannot take SMS) will never
  pass: the number goes on the suppression list with that reason;
- 30007 (filtered by the carrier as spam) is the sender's problem, not the number's: serve's
  delivery-health check raises the deliverability alert (consumer/serve/delivery_health.py).
"""

from __future__ import annotations

import logging
import uuid

import psycopg

from consumer.logs import mask_phone
from consumer.ops import suppression
from consumer.pipeline import SuppressionReason

log = logging.getLogger(__name__)

UNDELIVERED = frozenset({"undelivered", "failed"})
SEND_AGAIN_ONCE = frozenset({30003, 30008})
SEND_AGAIN_AFTER_SECONDS = 600.0
SUPPRESS = {30005: "unknown_number", 30006: "landline"}
CARRIER_FILTERED = 30007

# Once: not when an earlier SID of this notification already failed for one of these codes.
# Not when the new try would come after the message's expiry.
_MAY_SEND_AGAIN = """
SELECT NOT EXISTS (SELECT 1 FROM twilio_superseded_sid t
                   WHERE t.notification_id = n.id AND t.error_code = ANY(%(codes)s))
       AND (n.expire_datetime IS NULL
            OR n.expire_datetime > now() + make_interval(secs => %(delay)s))
FROM notification n WHERE n.id = %(id)s
"""


def sends_again(status: str, error_code: int | None) -> bool:
    return status in UNDELIVERED and error_code in SEND_AGAIN_ONCE


def may_send_again(conn: psycopg.Connection, notification_id: uuid.UUID) -> bool:
    row = conn.execute(_MAY_SEND_AGAIN, {"id": notification_id, "codes": list(SEND_AGAIN_ONCE),
                                         "delay": SEND_AGAIN_AFTER_SECONDS}).fetchone()
    return bool(row and row[0])


def suppression_reason(status: str, error_code: int | None) -> str | None:
    if status not in UNDELIVERED or error_code is None:
        return None
    return SUPPRESS.get(error_code)


def suppress_number_of(conn: psycopg.Connection, notification_id: uuid.UUID,
                       reason: str) -> None:
    """The recipient of this notification receives nothing more (30005 / 30006)."""
    row = conn.execute("SELECT to_phone_number FROM sms_notification WHERE notification_id = %s",
                       (notification_id,)).fetchone()
    if row is not None:
        add_to_suppression_list(conn, row[0], reason, notification_id)


def add_to_suppression_list(conn: psycopg.Connection, number: str, reason: str,
                            notification_id: uuid.UUID) -> None:
    """The one place a carrier outcome adds a number to the suppression list, in the
    callback's transaction; logged once, when the number was not on it yet."""
    detail = f"a status callback of notification {notification_id} said so"
    if not suppression.add(conn, [number], SuppressionReason(reason), detail):
        return
    log.warning("number added to the suppression list by a carrier outcome", extra={
        "action": "number_suppressed", "reason": reason, "to": mask_phone(number),
        "notification_id": str(notification_id)})
