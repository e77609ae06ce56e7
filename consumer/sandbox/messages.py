"""The messages `smsq fake-twilio` holds: each one's timeline, its Message resource as Twilio's
API 2010-04-01 shows it, and the DateSent filters of the list."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone

API_VERSION = "2010-04-01"
# The sender a Messaging Service "picks" once a message without From is sent.
SERVICE_POOL_NUMBER = "+15005550006"
# Not one of Twilio's test numbers: the fake's own. Accepted, then `undelivered` with 30003.
UNDELIVERABLE_TO = "+15005553003"
UNDELIVERED_ERROR = 30003
# The error_message of the resource for each error_code the fake ends a message with (the titles
# of Twilio's error pages).
DELIVERY_ERRORS = {
    30001: "Queue overflow",
    30003: "Unreachable destination handset",
    30022: "US A2P 10DLC - Rate Limits Exceeded",
}
DATE_SENT_FILTERS = {"DateSent": "=", "DateSent<": "<=", "DateSent>": ">="}


@dataclass
class Received:
    """One message creation request as the fake saw it, and what it answered."""

    seq: int  # position in the log, from 1
    received_at: float  # epoch seconds
    # When its first packet reached this host (the kernel's stamp), as time.monotonic():
    # comparable with other processes on this host.
    received_monotonic: float
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    media_url: list[str]
    status_callback: str | None
    http_status: int | None = None  # None: no answer (dropped connection)
    error_code: int | None = None  # of the answer
    fault: str | None = None  # the mode of the fault rule applied, if any
    sid: str | None = None
    created_seq: int = 0  # creation order among accepted messages (Twilio lists newest first)
    num_segments: int = 0
    sent_at: float = 0.0  # epoch second it leaves `queued`, once accepted
    done_at: float = 0.0  # epoch second it reaches its final status
    final_status: str = "delivered"  # or undelivered, failed
    final_error_code: int | None = None  # the message's error_code once final (30003, 30001...)
    price: str | None = None  # Twilio's form: negative, e.g. "-0.00790"; None: never charged
    priced_at: float = 0.0  # epoch second Twilio fills `price` in (some time after sending)

    @property
    def accepted(self) -> bool:
        return self.sid is not None

    @property
    def sender(self) -> str:
        return self.from_ or self.messaging_service_sid or ""

    def status(self, now: float) -> str:
        if now >= self.done_at:
            return self.final_status
        if now >= self.sent_at:
            return "sent"
        return "accepted" if self.from_ is None else "queued"

    def date_sent(self, now: float) -> float | None:
        # A message that failed never left Twilio.
        if now < self.sent_at or self.final_status == "failed":
            return None
        return self.sent_at

    def error_code_at(self, now: float) -> int | None:
        return self.final_error_code if now >= self.done_at else None

    def from_at(self, now: float) -> str | None:
        # A Messaging Service chooses the sender when it sends, not when it accepts.
        return self.from_ or (SERVICE_POOL_NUMBER if now >= self.sent_at else None)

    def price_at(self, now: float) -> str | None:
        return self.price if now >= self.priced_at else None

    def as_log(self, now: float) -> dict:
        entry = asdict(self)
        entry["from"] = entry.pop("from_")
        entry["accepted"] = self.accepted
        entry["status"] = self.status(now) if self.accepted else None
        return entry


def rfc2822(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(epoch))


def resource(entry: Received, account_sid: str, now: float) -> dict:
    """A Message resource as Twilio's API 2010-04-01 returns it, plus `fake_fault` (the fault
    applied to its creation, not a Twilio field: the client ignores it)."""
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{entry.sid}"
    error_code = entry.error_code_at(now)
    return {
        "account_sid": account_sid, "api_version": API_VERSION, "body": entry.body,
        "date_created": rfc2822(entry.received_at), "date_sent": rfc2822(entry.date_sent(now)),
        "date_updated": rfc2822(max(t for t in (entry.received_at, entry.sent_at,
                                                entry.done_at) if t <= now)),
        "direction": "outbound-api", "error_code": error_code,
        "error_message": DELIVERY_ERRORS.get(error_code) if error_code else None,
        "fake_fault": entry.fault, "from": entry.from_at(now),
        "messaging_service_sid": entry.messaging_service_sid,
        "num_media": str(len(entry.media_url)), "num_segments": str(entry.num_segments),
        "price": entry.price_at(now), "price_unit": "USD", "sid": entry.sid,
        "status": entry.status(now),
        "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
        "to": entry.to, "uri": f"{uri}.json",
    }


def gmt_day(value: str) -> date:
    """The GMT date of a DateSent value: a date (what Twilio documents) or a datetime (what
    twilio-python sends); a datetime without offset is taken as GMT."""
    if len(value) <= 10:
        return date.fromisoformat(value)
    moment = datetime.fromisoformat(value.replace(" ", "T", 1))
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.date()


def list_filter(params: dict[str, str], now: float):
    """A predicate for the To / From / DateSent filters of the list. DateSent compares GMT days
    (`DateSent<` and `DateSent>` are the wire form of Twilio's inclusive `DateSent<=` and
    `DateSent>=`); a message without date_sent (queued, failed) matches no DateSent filter."""
    days = {DATE_SENT_FILTERS[key]: gmt_day(value) for key, value in params.items()
            if key in DATE_SENT_FILTERS}
    to, from_ = params.get("To"), params.get("From")

    def keep(entry: Received) -> bool:
        if to is not None and entry.to != to:
            return False
        if from_ is not None and entry.from_at(now) != from_:
            return False
        if not days:
            return True
        sent_at = entry.date_sent(now)
        if sent_at is None:
            return False
        sent_day = datetime.fromtimestamp(sent_at, timezone.utc).date()
        return (sent_day == days.get("=", sent_day) and sent_day <= days.get("<=", sent_day)
                and sent_day >= days.get(">=", sent_day))

    return keep
