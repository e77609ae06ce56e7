"""The sandbox's state: accounts, messages, faults, timings; what each API call answers.

The HTTP side is `consumer/sandbox/http.py`, the client that drives it `control.py`; the
package's docstring says what the sandbox does.
"""

from __future__ import annotations

import base64
import bisect
import hmac
import itertools
import logging
import random
import secrets
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

from consumer.sandbox.callbacks import StatusCallbacks, callback_plan
from consumer.sandbox.faults import (
    CREATED_FAULTS,
    FAIL_FAULTS,
    FaultBook,
    FaultError,
    FaultRule,
    Reply,
    error_reply,
    rejection,
    server_error_reply,
)
from consumer.sandbox.messages import (
    API_VERSION,
    UNDELIVERABLE_TO,
    UNDELIVERED_ERROR,
    Received,
    list_filter,
    resource,
)
from consumer.segments import segments_of
from consumer.settings import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN

log = logging.getLogger(__name__)

# The sandbox's default account (settings.py says why it is shaped so).
FAKE_ACCOUNT_SID, FAKE_AUTH_TOKEN = SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN
MAX_BODY = 1600
SWITCHES = ("callback_duplicates", "callback_reorder")  # settings that are 0 or 1

# Twilio's test numbers (docs: "Test credentials", test SMS messages).
MAGIC_TO = {
    "+15005550001": (21211, "The 'To' number +15005550001 is not a valid phone number."),
    "+15005550002": (21612, "The 'To' phone number: +15005550002, is not currently reachable "
                            "using the 'From' phone number via SMS."),
    "+15005550003": (21408, "Permission to send an SMS has not been enabled for the region "
                            "indicated by the 'To' number: +15005550003."),
    "+15005550004": (21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (21614, "'To' number is not a valid mobile number"),
}
MAGIC_FROM = {
    "+15005550001": (21212, "The 'From' number +15005550001 is not a valid phone number, "
                            "shortcode, or alphanumeric sender ID."),
    "+15005550008": (21611, "This 'From' number has exceeded the maximum number of queued "
                            "messages"),
}


class FakeTwilio:
    """The fake's state: accounts, messages, faults, timings. Thread-safe."""

    def __init__(self, account_sid: str = FAKE_ACCOUNT_SID, auth_token: str = FAKE_AUTH_TOKEN,
                 latency_ms: float = 0, jitter_ms: float = 0, send_delay_ms: float = 100,
                 deliver_delay_ms: float = 400, price_delay_ms: float = 1000,
                 price_per_segment: float = 0.0079, faults: list[FaultRule] | None = None,
                 callback_duplicates: bool = False, callback_reorder: bool = False,
                 opted_out: list[str] | None = None) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self._expected_auth = "Basic " + base64.b64encode(
            f"{account_sid}:{auth_token}".encode()).decode()
        self.config = {"latency_ms": latency_ms, "jitter_ms": jitter_ms,
                       "send_delay_ms": send_delay_ms, "deliver_delay_ms": deliver_delay_ms,
                       "price_delay_ms": price_delay_ms, "price_per_segment": price_per_segment,
                       "callback_duplicates": float(callback_duplicates),
                       "callback_reorder": float(callback_reorder)}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._created_seq = itertools.count(1)
        self._received: list[Received] = []
        self._by_sid: dict[str, Received] = {}
        self._by_to: dict[str, list[Received]] = defaultdict(list)
        self._faults = FaultBook(faults)
        # Recipients who texted STOP: Twilio refuses every message to them with 21610.
        self._opted_out: set[str] = set(opted_out or ())
        self.stats: Counter[str] = Counter()
        self.callbacks = StatusCallbacks(RequestValidator(auth_token))

    @property
    def messages_uri(self) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/Messages"

    def latency(self) -> float:
        jitter = self.config["jitter_ms"]
        return (self.config["latency_ms"] + (random.uniform(0, jitter) if jitter else 0)) / 1000

    def authorised(self, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(header, self._expected_auth)

    def account_refusal(self, path: str) -> Reply | None:
        """The answer to any API request while an account-wide fault (20003, 20404) lasts."""
        rule = self._faults.account_fault()
        if rule is None:
            return None
        self._count_fault(rule.mode)
        return rejection(rule, path)

    # --- the API -------------------------------------------------------------------------

    def create(self, form: dict[str, list[str]], arrived: float | None = None) -> Reply:
        """`arrived`: the request's time.monotonic() when its first packet came in."""
        now = time.time()
        first = {key: values[0] for key, values in form.items()}
        entry = Received(
            seq=0, received_at=now,
            received_monotonic=time.monotonic() if arrived is None else arrived,
            to=first.get("To", ""), from_=first.get("From") or None,
            messaging_service_sid=first.get("MessagingServiceSid") or None,
            body=first.get("Body", ""), media_url=form.get("MediaUrl", []),
            status_callback=first.get("StatusCallback") or None)
        reply = self._create_reply(entry, now)
        entry.http_status = None if reply.drop else reply.status
        entry.error_code = reply.error_code
        with self._lock:
            # Numbered as logged, so the log is in seq order (what `received(after)` relies on).
            entry.seq = next(self._seq)
            self._received.append(entry)
            self.stats["create"] += 1
        return reply

    def _create_reply(self, entry: Received, now: float) -> Reply:
        fault = self._faults.take(entry.to, entry.sender)
        if fault is not None:
            entry.fault = fault.mode
            self._count_fault(fault.mode)
            refused = rejection(fault, f"{self.messages_uri}.json")
            if refused is not None:
                return refused
            if fault.mode == "drop-unrecorded":
                return Reply(0, None, drop=True)
        rejected = self._validate(entry)
        if rejected is not None:
            return rejected
        self._accept(entry, now, fault)
        return self._answer_created(entry, now, fault)

    def _answer_created(self, entry: Received, now: float, fault: FaultRule | None) -> Reply:
        mode = fault.mode if fault is not None else None
        if mode in CREATED_FAULTS:
            return server_error_reply(CREATED_FAULTS[mode])
        return Reply(201, resource(entry, self.account_sid, now),
                     delay=fault.slow_ms / 1000 if fault is not None and mode == "slow" else 0.0,
                     drop=mode == "drop")

    def _count_fault(self, mode: str) -> None:
        with self._lock:
            self.stats[f"fault_{mode}"] += 1

    def _validate(self, entry: Received) -> Reply | None:
        if not entry.to:
            return error_reply(400, 21604, "A 'To' phone number is required.")
        if not entry.from_ and not entry.messaging_service_sid:
            return error_reply(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is "
                                           "required to send a message")
        if not entry.body and not entry.media_url:
            return error_reply(400, 21602, "Message body is required.")
        if len(entry.body) > MAX_BODY:
            return error_reply(400, 21617, "The concatenated message body exceeds the 1600 "
                                           "character limit.")
        if entry.to in MAGIC_TO:
            return error_reply(400, *MAGIC_TO[entry.to])
        if entry.to in self._opted_out:
            return error_reply(400, *MAGIC_TO["+15005550004"])  # 21610, unsubscribed
        if entry.from_ in MAGIC_FROM:
            return error_reply(400, *MAGIC_FROM[entry.from_])
        if not (entry.to.startswith("+") and entry.to[1:].isdigit() and 8 <= len(entry.to) <= 16):
            return error_reply(400, 21211, f"The 'To' number {entry.to} is not a valid phone "
                                           "number.")
        return None

    def _accept(self, entry: Received, now: float, fault: FaultRule | None) -> None:
        entry.sid = ("MM" if entry.media_url else "SM") + secrets.token_hex(16)
        # A Messaging Service has not chosen a sender yet, so Twilio reports 0 segments.
        entry.num_segments = 0 if entry.from_ is None else segments_of(entry.body).segments
        self._set_timeline(entry, now, fault)
        with self._lock:
            entry.created_seq = next(self._created_seq)
            self._by_sid[entry.sid] = entry
            self._by_to[entry.to].append(entry)
        if entry.status_callback:
            self.callbacks.schedule(entry.status_callback, callback_plan(
                entry, self.account_sid, duplicates=bool(self.config["callback_duplicates"]),
                reorder=bool(self.config["callback_reorder"])))

    def _set_timeline(self, entry: Received, now: float, fault: FaultRule | None) -> None:
        """When it leaves `queued` and how it ends."""
        mode = fault.mode if fault is not None else None
        queued_ms = (fault.hold_ms if fault is not None and mode == "hold"
                     else self.config["send_delay_ms"])
        entry.sent_at = now + queued_ms / 1000
        entry.done_at = entry.sent_at + self.config["deliver_delay_ms"] / 1000
        if mode in FAIL_FAULTS:
            # Dropped from Twilio's queue when its turn came: it fails instead of being sent.
            entry.final_status, entry.final_error_code = "failed", FAIL_FAULTS[mode]
            entry.done_at = entry.sent_at
        elif entry.to == UNDELIVERABLE_TO:
            entry.final_status, entry.final_error_code = "undelivered", UNDELIVERED_ERROR
        self._set_price(entry)

    def _set_price(self, entry: Received) -> None:
        """Twilio charges what it sent (delivered or not) and fills the price in later; a
        message that failed in its queue was never sent and costs nothing."""
        if entry.final_status == "failed":
            return
        segments = max(1, segments_of(entry.body).segments)
        entry.price = f"-{self.config['price_per_segment'] * segments:.5f}"
        entry.priced_at = entry.sent_at + self.config["price_delay_ms"] / 1000

    def fetch(self, sid: str, path: str) -> Reply:
        with self._lock:
            self.stats["fetch"] += 1
            entry = self._by_sid.get(sid)
        if entry is None:
            return error_reply(404, 20404, f"The requested resource {path} was not found")
        return Reply(200, resource(entry, self.account_sid, time.time()))

    def list_messages(self, query: dict[str, list[str]]) -> Reply:
        """Newest first, filtered, paged (PageSize, Page, PageToken = "PA" + last SID seen)."""
        now = time.time()
        params = {key: values[0] for key, values in query.items()}
        try:
            page_size = min(1000, max(1, int(params.get("PageSize", 50))))
            page = max(0, int(params.get("Page", 0)))
            keep = list_filter(params, now)
        except ValueError as exc:
            return error_reply(400, 20001, f"Invalid parameter: {exc}")
        token = params.get("PageToken", "")
        with self._lock:
            self.stats["list"] += 1
            pool = self._by_to.get(params["To"], []) if "To" in params else self._by_sid.values()
            matching = sorted((e for e in pool if keep(e)), key=lambda e: e.created_seq,
                              reverse=True)
            last_seen = self._by_sid.get(token[2:]) if token.startswith("PA") else None
        if last_seen is not None:  # a token pages on from where the last page ended
            matching = [e for e in matching if e.created_seq < last_seen.created_seq]
        else:
            matching = matching[page * page_size:]
        filters = {k: v for k, v in params.items() if k not in ("PageSize", "Page", "PageToken")}
        return Reply(200, self._page(matching, filters, page, page_size, token, now))

    def _page(self, matching: list[Received], filters: dict[str, str], page: int,
              page_size: int, token: str, now: float) -> dict:
        items = matching[:page_size]

        def page_uri(number: int, token: str | None = None) -> str:
            extra: dict[str, int | str] = {"PageSize": page_size, "Page": number}
            if token:
                extra["PageToken"] = token
            return f"{self.messages_uri}.json?{urlencode(filters | extra)}"

        return {
            "messages": [resource(e, self.account_sid, now) for e in items],
            "start": page * page_size, "end": page * page_size + max(0, len(items) - 1),
            "page": page, "page_size": page_size,
            "first_page_uri": page_uri(0), "previous_page_uri": None,
            "uri": page_uri(page, token or None),
            "next_page_uri": (page_uri(page + 1, f"PA{items[-1].sid}")
                              if len(matching) > page_size else None),
        }

    # --- the control API -----------------------------------------------------------------

    def received(self, after: int = 0) -> list[dict]:
        """The log of creation requests with `seq` above `after` (for cheap polling)."""
        now = time.time()
        with self._lock:
            start = bisect.bisect_right(self._received, after, key=lambda entry: entry.seq)
            return [entry.as_log(now) for entry in self._received[start:]]

    def clear(self) -> None:
        with self._lock:
            self._received.clear()
            self._by_sid.clear()
            self._by_to.clear()
            self.stats.clear()
        self.callbacks.clear()

    def opt_out(self, add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
        """Recipients that opted out (answered 21610) after adding and removing some."""
        with self._lock:
            self._opted_out.update(add)
            self._opted_out.difference_update(remove)
            return sorted(self._opted_out)

    def set_faults(self, rules: list[FaultRule]) -> None:
        self._faults.replace(rules)

    def faults(self) -> list[dict]:
        return self._faults.as_dicts()

    def configure(self, changes: dict) -> dict:
        unknown = set(changes) - set(self.config)
        if unknown:
            raise FaultError(f"unknown setting(s): {sorted(unknown)}")
        values = {key: float(value) for key, value in changes.items()}
        for key in SWITCHES:
            if values.get(key, 0) not in (0, 1):
                raise FaultError(f"{key} must be 0 or 1")
        self.config.update(values)
        return dict(self.config)

    def all_stats(self) -> dict:
        with self._lock:
            return dict(self.stats) | self.callbacks.counts()
