"""A local stand-in for Twilio's Messages API (`smsq fake-twilio`). Nothing reaches any phone.

Good enough that the official `twilio` client works against it unchanged but for the base URL:
create, fetch and list messages (To / From / DateSent filters, paging), HTTP basic auth, Twilio's
JSON and legacy error bodies, Twilio's test numbers, and signed status callbacks. On top of that,
what a sandbox needs for tests and benchmarks: latency, injected faults, and a log of everything
received with arrival times, all controllable at run time under `/_fake/` (no auth: it listens
on 127.0.0.1 by default and is a test tool).

Faithful where it matters to a sender that must never send twice: a new message is `queued`
(or `accepted` through a Messaging Service) with `date_sent` null, becomes `sent` after the send
delay and `delivered` after the delivery delay; DateSent filters skip messages not sent yet, and
compare by day, as Twilio documents.

Stdlib `ThreadingHTTPServer` speaking HTTP/1.1 keep-alive, chosen over uvicorn because a fault
must be able to close the TCP connection without any response, which ASGI cannot express.
"""

from __future__ import annotations

import base64
import bisect
import hmac
import heapq
import itertools
import json
import logging
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from twilio.request_validator import RequestValidator

from consumer.segments import segments_of

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
# Shaped as Twilio's (AC + 32 hex digits), so that code checking SIDs accepts it; the same
# account as the sandbox of scripts/run.sh and docker-compose.yml.
FAKE_ACCOUNT_SID = "AC" + "0" * 32
FAKE_AUTH_TOKEN = "fake-token"
# The sender a Messaging Service "picks" once a message without From is sent.
SERVICE_POOL_NUMBER = "+15005550006"
# Not one of Twilio's test numbers: the fake's own. Accepted, then `undelivered` with 30003.
UNDELIVERABLE_TO = "+15005553003"
UNDELIVERED_ERROR = 30003
MAX_BODY = 1600

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

# Injected faults that answer with an error instead of accepting the message.
ERROR_FAULTS = {
    "429": (429, 20429, "Too Many Requests"),
    "500": (500, 20500, "An internal server error has occurred"),
    "503": (503, 20503, "Service Unavailable"),
    "21611": (400, 21611, MAGIC_FROM["+15005550008"][1]),
}
# slow: accepted, answered after slow_ms. drop: accepted, then the connection is closed without
# an answer. drop-unrecorded: closed without an answer and NOT accepted (lost on the way in).
FAULT_MODES = frozenset(ERROR_FAULTS) | {"slow", "drop", "drop-unrecorded"}


class FaultError(ValueError):
    """A fault description that does not make sense."""


@dataclass
class FaultRule:
    """Applies to message creations matching `to` / `sender` (when set): the next `count` of
    them (None: all), each with `probability`."""

    mode: str
    count: int | None = None
    probability: float = 1.0
    retry_after: float = 1.0  # seconds, sent as Retry-After with "429"
    slow_ms: float = 30_000.0  # how late "slow" answers
    to: str | None = None
    sender: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise FaultError(f"unknown fault mode {self.mode!r}; one of {sorted(FAULT_MODES)}")
        if self.count is not None and self.count < 1:
            raise FaultError("count must be at least 1")
        if not 0 < self.probability <= 1:
            raise FaultError("probability must be in (0, 1]")

    @classmethod
    def from_dict(cls, spec: dict) -> FaultRule:
        known = {f.name for f in fields(cls)}
        unknown = set(spec) - known
        if unknown:
            raise FaultError(f"unknown fault field(s): {sorted(unknown)}")
        return cls(**spec)

    @classmethod
    def parse(cls, text: str) -> FaultRule:
        """`MODE[:key=value,...]`, e.g. `429:count=3,retry_after=2` (the --fault flag)."""
        mode, _, options = text.partition(":")
        spec: dict[str, object] = {"mode": mode}
        for option in filter(None, options.split(",")):
            key, sep, value = option.partition("=")
            if not sep:
                raise FaultError(f"expected key=value in {option!r}")
            spec[key] = value if key in ("to", "sender") else float(value)
        if "count" in spec:
            spec["count"] = int(spec["count"])  # type: ignore[arg-type]
        return cls.from_dict(spec)

    def matches(self, to: str, sender: str) -> bool:
        return (self.to in (None, to) and self.sender in (None, sender)
                and (self.probability >= 1 or random.random() < self.probability))


@dataclass
class Received:
    """One message creation request as the fake saw it, and what it answered."""

    seq: int  # position in the log, from 1
    received_at: float  # epoch seconds
    received_monotonic: float  # time.monotonic(): comparable with other processes on this host
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    media_url: list[str]
    status_callback: str | None
    http_status: int | None = None  # None: no answer (dropped connection)
    error_code: int | None = None
    fault: str | None = None
    sid: str | None = None
    created_seq: int = 0  # creation order among accepted messages (Twilio lists newest first)
    num_segments: int = 0
    sent_at: float = 0.0  # epoch second it leaves `queued`, once accepted
    done_at: float = 0.0  # epoch second it reaches its final delivery status

    @property
    def accepted(self) -> bool:
        return self.sid is not None

    @property
    def sender(self) -> str:
        return self.from_ or self.messaging_service_sid or ""

    def status(self, now: float) -> str:
        if now >= self.done_at:
            return "undelivered" if self.to == UNDELIVERABLE_TO else "delivered"
        if now >= self.sent_at:
            return "sent"
        return "accepted" if self.from_ is None else "queued"

    def from_at(self, now: float) -> str | None:
        # A Messaging Service chooses the sender when it sends, not when it accepts.
        return self.from_ or (SERVICE_POOL_NUMBER if now >= self.sent_at else None)

    def as_log(self, now: float) -> dict:
        entry = asdict(self)
        entry["from"] = entry.pop("from_")
        entry["accepted"] = self.accepted
        entry["status"] = self.status(now) if self.accepted else None
        return entry


@dataclass
class Reply:
    status: int
    body: dict | None  # None with drop=True
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (beyond the configured latency)
    drop: bool = False  # close the connection without any answer


def rfc2822(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(epoch))


def error_reply(status: int, code: int, message: str, **headers: str) -> Reply:
    """Twilio's legacy error body, which twilio-python turns into TwilioRestException."""
    return Reply(status, {"code": code, "message": message,
                          "more_info": f"https://www.twilio.com/docs/errors/{code}",
                          "status": status}, headers)


class FakeTwilio:
    """The fake's state: accounts, messages, faults, timings. Thread-safe."""

    def __init__(self, account_sid: str = FAKE_ACCOUNT_SID, auth_token: str = FAKE_AUTH_TOKEN,
                 latency_ms: float = 0, jitter_ms: float = 0, send_delay_ms: float = 100,
                 deliver_delay_ms: float = 400, faults: list[FaultRule] | None = None) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self._expected_auth = "Basic " + base64.b64encode(
            f"{account_sid}:{auth_token}".encode()).decode()
        self.config = {"latency_ms": latency_ms, "jitter_ms": jitter_ms,
                       "send_delay_ms": send_delay_ms, "deliver_delay_ms": deliver_delay_ms}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._created_seq = itertools.count(1)
        self._received: list[Received] = []
        self._by_sid: dict[str, Received] = {}
        self._by_to: dict[str, list[Received]] = defaultdict(list)
        self._faults = list(faults or [])
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

    # --- the API -------------------------------------------------------------------------

    def create(self, form: dict[str, list[str]]) -> Reply:
        now = time.time()
        first = {key: values[0] for key, values in form.items()}
        entry = Received(
            seq=0, received_at=now, received_monotonic=time.monotonic(),
            to=first.get("To", ""), from_=first.get("From") or None,
            messaging_service_sid=first.get("MessagingServiceSid") or None,
            body=first.get("Body", ""), media_url=form.get("MediaUrl", []),
            status_callback=first.get("StatusCallback") or None)
        reply = self._create_reply(entry, now)
        entry.http_status = None if reply.drop else reply.status
        entry.error_code = reply.body.get("code") if reply.body and reply.status >= 400 else None
        with self._lock:
            # Numbered as logged, so the log is in seq order (what `received(after)` relies on).
            entry.seq = next(self._seq)
            self._received.append(entry)
            self.stats["create"] += 1
        return reply

    def _create_reply(self, entry: Received, now: float) -> Reply:
        fault = self._take_fault(entry.to, entry.sender)
        if fault is not None:
            entry.fault = fault.mode
            if fault.mode in ERROR_FAULTS:
                status, code, message = ERROR_FAULTS[fault.mode]
                headers = {"Retry-After": f"{fault.retry_after:g}"} if status == 429 else {}
                return error_reply(status, code, message, **headers)
            if fault.mode == "drop-unrecorded":
                return Reply(0, None, drop=True)
        rejection = self._validate(entry)
        if rejection is not None:
            return rejection
        self._accept(entry, now)
        reply = Reply(201, self.resource(entry, now))
        if fault is not None:
            reply.delay = fault.slow_ms / 1000 if fault.mode == "slow" else 0.0
            reply.drop = fault.mode == "drop"
        return reply

    def _take_fault(self, to: str, sender: str) -> FaultRule | None:
        with self._lock:
            for rule in self._faults:
                if rule.matches(to, sender):
                    if rule.count is not None:
                        rule.count -= 1
                        if rule.count == 0:
                            self._faults.remove(rule)
                    return rule
        return None

    @staticmethod
    def _validate(entry: Received) -> Reply | None:
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
        if entry.from_ in MAGIC_FROM:
            return error_reply(400, *MAGIC_FROM[entry.from_])
        if not (entry.to.startswith("+") and entry.to[1:].isdigit() and 8 <= len(entry.to) <= 16):
            return error_reply(400, 21211, f"The 'To' number {entry.to} is not a valid phone "
                                           "number.")
        return None

    def _accept(self, entry: Received, now: float) -> None:
        entry.sid = "SM" + secrets.token_hex(16)
        # A Messaging Service has not chosen a sender yet, so Twilio reports 0 segments.
        entry.num_segments = 0 if entry.from_ is None else segments_of(entry.body).segments
        entry.sent_at = now + self.config["send_delay_ms"] / 1000
        entry.done_at = entry.sent_at + self.config["deliver_delay_ms"] / 1000
        with self._lock:
            entry.created_seq = next(self._created_seq)
            self._by_sid[entry.sid] = entry
            self._by_to[entry.to].append(entry)
        if entry.status_callback:
            self.callbacks.schedule(entry, self.account_sid)

    def fetch(self, sid: str, path: str) -> Reply:
        with self._lock:
            self.stats["fetch"] += 1
            entry = self._by_sid.get(sid)
        if entry is None:
            return error_reply(404, 20404, f"The requested resource {path} was not found")
        return Reply(200, self.resource(entry, time.time()))

    def list_messages(self, query: dict[str, list[str]]) -> Reply:
        """Newest first, filtered, paged (PageSize, Page, PageToken = "PA" + last SID seen)."""
        now = time.time()
        params = {key: values[0] for key, values in query.items()}
        try:
            page_size = min(1000, max(1, int(params.get("PageSize", 50))))
            page = max(0, int(params.get("Page", 0)))
            keep = self._list_filter(params, now)
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
            extra = {"PageSize": page_size, "Page": number} | ({"PageToken": token} if token else {})
            return f"{self.messages_uri}.json?{urlencode(filters | extra)}"

        return {
            "messages": [self.resource(e, now) for e in items],
            "start": page * page_size, "end": page * page_size + max(0, len(items) - 1),
            "page": page, "page_size": page_size,
            "first_page_uri": page_uri(0), "previous_page_uri": None,
            "uri": page_uri(page, token or None),
            "next_page_uri": (page_uri(page + 1, f"PA{items[-1].sid}")
                              if len(matching) > page_size else None),
        }

    @staticmethod
    def _list_filter(params: dict[str, str], now: float):
        """A predicate for To/From/DateSent filters. Twilio's DateSent filters take a day
        (YYYY-MM-DD); twilio-python sends datetimes, so only their day is used."""
        day = {key: date.fromisoformat(params[key][:10])
               for key in ("DateSent", "DateSent<", "DateSent>") if key in params}
        to, from_ = params.get("To"), params.get("From")

        def keep(entry: Received) -> bool:
            if to is not None and entry.to != to:
                return False
            if from_ is not None and entry.from_at(now) != from_:
                return False
            if not day:
                return True
            if now < entry.sent_at:  # not sent yet: no date_sent to compare
                return False
            sent_day = datetime.fromtimestamp(entry.sent_at, timezone.utc).date()
            return (sent_day == day.get("DateSent", sent_day)
                    and sent_day <= day.get("DateSent<", sent_day)
                    and sent_day >= day.get("DateSent>", sent_day))

        return keep

    def resource(self, entry: Received, now: float) -> dict:
        """A Message resource as Twilio's API 2010-04-01 returns it."""
        uri = f"{self.messages_uri}/{entry.sid}"
        status = entry.status(now)
        date_sent = entry.sent_at if now >= entry.sent_at else None
        return {
            "account_sid": self.account_sid, "api_version": API_VERSION, "body": entry.body,
            "date_created": rfc2822(entry.received_at), "date_sent": rfc2822(date_sent),
            "date_updated": rfc2822(max(t for t in (entry.received_at, entry.sent_at,
                                                    entry.done_at) if t <= now)),
            "direction": "outbound-api",
            "error_code": UNDELIVERED_ERROR if status == "undelivered" else None,
            "error_message": None, "from": entry.from_at(now),
            "messaging_service_sid": entry.messaging_service_sid,
            "num_media": str(len(entry.media_url)), "num_segments": str(entry.num_segments),
            "price": None, "price_unit": "USD", "sid": entry.sid, "status": status,
            "subresource_uris": {"media": f"{uri}/Media.json",
                                 "feedback": f"{uri}/Feedback.json"},
            "to": entry.to, "uri": f"{uri}.json",
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

    def set_faults(self, rules: list[FaultRule]) -> None:
        with self._lock:
            self._faults = list(rules)

    def faults(self) -> list[dict]:
        with self._lock:
            return [asdict(rule) for rule in self._faults]

    def configure(self, changes: dict) -> dict:
        unknown = set(changes) - set(self.config)
        if unknown:
            raise FaultError(f"unknown setting(s): {sorted(unknown)}")
        self.config.update({key: float(value) for key, value in changes.items()})
        return dict(self.config)

    def all_stats(self) -> dict:
        with self._lock:
            return dict(self.stats) | self.callbacks.counts()


class StatusCallbacks:
    """Posts Twilio-signed status callbacks ("sent", then the delivery status) when due."""

    def __init__(self, validator: RequestValidator) -> None:
        self._validator = validator
        self._due: list[tuple[float, int, str, dict[str, str]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-twilio-callback")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.log: list[dict] = []

    def schedule(self, entry: Received, account_sid: str) -> None:
        for status, at in (("sent", entry.sent_at), (entry.status(entry.done_at), entry.done_at)):
            params = {"AccountSid": account_sid, "ApiVersion": API_VERSION,
                      "From": entry.from_at(at) or "", "MessageSid": entry.sid or "",
                      "MessageStatus": status, "SmsSid": entry.sid or "", "SmsStatus": status,
                      "To": entry.to}
            if entry.messaging_service_sid:
                params["MessagingServiceSid"] = entry.messaging_service_sid
            if status == "undelivered":
                params["ErrorCode"] = str(UNDELIVERED_ERROR)
            self._push(at, entry.status_callback or "", params)

    def _push(self, at: float, url: str, params: dict[str, str]) -> None:
        with self._wake:
            heapq.heappush(self._due, (at, next(self._order), url, params))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fake-twilio-callbacks",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (not self._due or self._due[0][0] > time.time()):
                    timeout = self._due[0][0] - time.time() if self._due else None
                    self._wake.wait(timeout)
                if self._stopping:
                    return
                _, _, url, params = heapq.heappop(self._due)
            self._pool.submit(self._post, url, params)

    def _post(self, url: str, params: dict[str, str]) -> None:
        signature = self._validator.compute_signature(url, params)
        request = urllib.request.Request(
            url, data=urlencode(params).encode(), method="POST",
            headers={"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1",
                     "Content-Type": "application/x-www-form-urlencoded"})
        outcome: dict[str, object] = {"url": url, "sid": params["MessageSid"],
                                      "status": params["MessageStatus"], "posted_at": time.time(),
                                      "http_status": None, "error": None}
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                outcome["http_status"] = response.status
        except urllib.error.HTTPError as exc:
            outcome["http_status"] = exc.code
        except OSError as exc:
            outcome["error"] = str(exc)
        outcome["ok"] = outcome["error"] is None and 200 <= int(outcome["http_status"] or 0) < 300
        with self._wake:
            self.log.append(outcome)

    def entries(self) -> list[dict]:
        with self._wake:
            return list(self.log)

    def counts(self) -> dict[str, int]:
        with self._wake:
            ok = sum(1 for outcome in self.log if outcome["ok"])
            return {"callbacks_ok": ok, "callbacks_failed": len(self.log) - ok,
                    "callbacks_waiting": len(self._due)}

    def clear(self) -> None:
        with self._wake:
            self._due.clear()
            self.log.clear()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)


class Handler(BaseHTTPRequestHandler):
    """Routes one request to the FakeTwilio of its server; keep-alive, one write per answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small answers must not wait for the client's delayed ACK
    server: FakeTwilioHTTPServer

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path.startswith("/_fake/"):
            self._answer(self._control(fake, method, url.path, url.query, body))
            return
        reply = self._api(fake, method, url.path, url.query, body)
        delay = fake.latency() + reply.delay
        if delay > 0:  # even sleep(0) costs a GIL round trip, a third of a fast request
            time.sleep(delay)
        if reply.drop:
            self.close_connection = True  # the socket is closed with nothing written
            return
        self._answer(reply)

    def _api(self, fake: FakeTwilio, method: str, path: str, query: str, body: bytes) -> Reply:
        if not path.startswith(f"/{API_VERSION}/Accounts/"):
            return error_reply(404, 20404, f"The requested resource {path} was not found")
        if not fake.authorised(self.headers.get("Authorization")):
            return error_reply(401, 20003, "Authenticate")
        prefix = fake.messages_uri
        if method == "POST" and path == f"{prefix}.json":
            return fake.create(parse_qs(body.decode(), keep_blank_values=True))
        if method == "GET" and path == f"{prefix}.json":
            return fake.list_messages(parse_qs(query, keep_blank_values=True))
        if method == "GET" and path.startswith(f"{prefix}/") and path.endswith(".json"):
            return fake.fetch(path[len(prefix) + 1:-len(".json")], path)
        return error_reply(404, 20404, f"The requested resource {path} was not found")

    @staticmethod
    def _control(fake: FakeTwilio, method: str, path: str, query: str, body: bytes) -> Reply:
        try:
            payload = json.loads(body) if body else {}
            if path == "/_fake/messages" and method in ("GET", "DELETE"):
                if method == "DELETE":
                    fake.clear()
                after = int(parse_qs(query).get("after", ["0"])[0])
                return Reply(200, {"messages": fake.received(after)})
            if path == "/_fake/faults" and method in ("GET", "POST", "DELETE"):
                if method != "GET":
                    specs = payload if isinstance(payload, list) else [payload] if payload else []
                    fake.set_faults([FaultRule.from_dict(s) for s in specs])
                return Reply(200, {"faults": fake.faults()})
            if path == "/_fake/config" and method in ("GET", "POST"):
                return Reply(200, fake.configure(payload))
            if path == "/_fake/stats" and method == "GET":
                return Reply(200, fake.all_stats())
            if path == "/_fake/callbacks" and method == "GET":
                return Reply(200, {"callbacks": fake.callbacks.entries()})
        except (FaultError, TypeError, ValueError) as exc:
            return Reply(400, {"error": str(exc)})
        return Reply(404, {"error": f"no {method} {path}"})

    def _answer(self, reply: Reply) -> None:
        content = json.dumps(reply.body).encode()
        head = [f"HTTP/1.1 {reply.status} {self.responses.get(reply.status, ('',))[0]}",
                "Content-Type: application/json; charset=utf-8",
                f"Content-Length: {len(content)}",
                *(f"{name}: {value}" for name, value in reply.headers.items())]
        if self.close_connection:
            head.append("Connection: close")
        try:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + content)
        except OSError:  # the client gave up first (e.g. its read timeout on a slow answer)
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        log.debug(format, *args, extra={"action": "fake_twilio_request"})


class FakeTwilioHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # 100+ clients connect at once; the default backlog is 5

    def __init__(self, address: tuple[str, int], fake: FakeTwilio) -> None:
        self.fake = fake
        super().__init__(address, Handler)


class FakeTwilioServer:
    """The fake, running in this process on its own threads (tests, benchmarks).

        with FakeTwilioServer() as server:
            client = Client(server.fake.account_sid, ..., http_client=...(server.url))
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: object) -> None:
        self.fake = FakeTwilio(**options)  # type: ignore[arg-type]
        self.http = FakeTwilioHTTPServer((host, port), self.fake)
        self._thread = threading.Thread(target=self.http.serve_forever, name="fake-twilio",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeTwilioServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.fake.callbacks.stop()

    def __enter__(self) -> FakeTwilioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeTwilioControl:
    """Drives a running fake (in this process or another) through its /_fake/ endpoints."""

    def __init__(self, url: str, account_sid: str = FAKE_ACCOUNT_SID,
                 auth_token: str = FAKE_AUTH_TOKEN) -> None:
        self.url = url.rstrip("/")
        self.account_sid = account_sid
        self.auth_token = auth_token

    def messages(self, accepted_only: bool = False, after: int = 0) -> list[dict]:
        """Every creation request received, in arrival order, with the outcome returned;
        only those with `seq` above `after` when given (poll with the last seq seen)."""
        messages = self._call("GET", f"/_fake/messages?after={after}")["messages"]
        return [m for m in messages if m["accepted"]] if accepted_only else messages

    def clear(self) -> None:
        """Forget every message and callback (faults and config stay)."""
        self._call("DELETE", "/_fake/messages")

    def set_fault(self, mode: str | None, **options: object) -> list[dict]:
        """Replace the faults with one rule (mode None: no faults), e.g.
        `set_fault("429", count=3, retry_after=2)` or `set_fault("500", probability=0.1)`."""
        return self.set_faults([] if mode is None else [{"mode": mode, **options}])

    def set_faults(self, rules: list[dict]) -> list[dict]:
        return self._call("POST", "/_fake/faults", rules)["faults"]

    def faults(self) -> list[dict]:
        return self._call("GET", "/_fake/faults")["faults"]

    def configure(self, **settings: float) -> dict:
        """latency_ms, jitter_ms, send_delay_ms, deliver_delay_ms."""
        return self._call("POST", "/_fake/config", settings)

    def set_latency(self, latency_ms: float, jitter_ms: float = 0) -> dict:
        return self.configure(latency_ms=latency_ms, jitter_ms=jitter_ms)

    def stats(self) -> dict:
        return self._call("GET", "/_fake/stats")

    def callbacks(self) -> list[dict]:
        return self._call("GET", "/_fake/callbacks")["callbacks"]

    def _call(self, method: str, path: str, payload: object = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def spawn(*flags: str, account_sid: str = FAKE_ACCOUNT_SID, auth_token: str = FAKE_AUTH_TOKEN,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, FakeTwilioControl]:
    """Start `smsq fake-twilio` as its own process on a free port (benchmarks, crash tests).
    Stop it with SIGTERM; its log goes to the parent's stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "fake-twilio", "--port", "0",
         "--account-sid", account_sid, "--auth-token", auth_token, *flags],
        # Not the working directory: a developer's .env there must not configure the fake.
        stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())
    url = process.stdout.readline().strip()  # type: ignore[union-attr]
    if not url.startswith("http://"):
        process.kill()
        raise RuntimeError(f"smsq fake-twilio did not start (exit status {process.wait()})")
    return process, FakeTwilioControl(url, account_sid, auth_token)
