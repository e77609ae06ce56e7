"""Short descriptions of the Twilio error codes an operator meets most, for the dashboard.

Twilio's status callbacks carry only the number; the full list is at
https://www.twilio.com/docs/api/errors.
"""

from __future__ import annotations

DESCRIPTIONS = {
    20003: "authentication failed (check TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN)",
    20429: "too many requests",
    21211: "invalid 'To' phone number",
    21408: "no permission to send to this region",
    21610: "recipient unsubscribed (replied STOP)",
    21611: "sender's queue is full",
    21614: "'To' number is not a mobile number",
    30001: "queue overflow",
    30002: "account suspended",
    30003: "unreachable destination handset",
    30004: "message blocked by the recipient or carrier",
    30005: "unknown destination handset",
    30006: "landline or unreachable carrier",
    30007: "filtered by the carrier as spam",
    30008: "unknown error from the carrier",
    30034: "sender not registered for A2P 10DLC",
}


def describe(code: int | None) -> str:
    if code is None:
        return "no Twilio code (expired, or an error in smsq)"
    return DESCRIPTIONS.get(code, "see twilio.com/docs/api/errors")
