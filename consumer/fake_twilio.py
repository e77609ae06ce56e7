"""A local stand-in for Twilio's Messages API (`smsq fake-twilio`). Nothing reaches any phone.

Good enough that the official `twilio` client works against it unchanged but for the base URL:
create, fetch and list messages (To / From / DateSent filters, paging), HTTP basic auth, Twilio's
JSON and legacy error bodies, Twilio's test numbers, and signed status callbacks. On top of that,
what a sandbox needs for tests and benchmarks: latency, injected faults, and a log of everything
received with arrival times, all controllable at run time under `/_fake/` (no auth: it listens
on 127.0.0.1 by default and is a test tool).

Faithful where it matters to a sender that must never send twice: a new message is `queued`
(or `accepted` through a Messaging Service) with `date_sent` null, becomes `sent` after the send
delay and `delivered` after the delivery delay; DateSent filters compare GMT days, as Twilio
documents, and skip messages without date_sent; the unfiltered list shows queued ones too, newest
first. Message SIDs are `SM` + 32 hex digits (`MM` for a message with media), the account's
`AC` + 32 hex digits; `error_message` is filled whenever `error_code` is.

Fault modes (`FaultRule.mode`; the --fault flag, POST /_fake/faults, `FakeTwilioControl.set_fault`):
- `429` (Retry-After: `retry_after`), `500` (20500), `503` (20503), `21611` (400, sender queue
  full): answered with Twilio's error; nothing is created.
- `502`, `504`: answered as a proxy in front of Twilio would (a short text/html page); nothing is
  created.
- `created-500`, `created-502`, `created-503`, `created-504`: the message IS created (stored,
  listed, its callbacks posted), but the answer is that 5xx (Twilio's JSON for 500 / 503, a
  proxy's HTML page for 502 / 504).
- `20003` (401, "Authenticate": revoked token, suspended account), `20404` (404, wrong account),
  `63038` (429, daily message limit of the account): nothing is created. A `20003` or `20404`
  rule without `to` / `sender` answers fetch and list too while it lasts.
- `fail-30001`, `fail-30022`: accepted (201, queued), then the message ends `failed` (never sent:
  no `sent` callback, date_sent null) with that error_code and its error_message, in the resource
  and in the status callback (ErrorCode).
- `hold`: accepted, but it stays queued with date_sent null for `hold_ms` (default 60000) before it
  is sent and delivered; its callbacks follow.
- `slow`: accepted, answered after `slow_ms`. `drop`: accepted, then the connection is closed
  without an answer. `drop-unrecorded`: closed without an answer, nothing created.
A rule hits the creations to `to` / from `sender` (when set; otherwise every create), the next
`count` of them (None: all), each with `probability`, and ends `seconds` after it was set (None:
never), whatever its count. The fault applied shows in the `/_fake/messages` log entry and in the
resource (`fake_fault`, not a Twilio field).

Settings (`/_fake/config`, `FakeTwilioControl.configure`), read when a message is created:
`latency_ms`, `jitter_ms`, `send_delay_ms`, `deliver_delay_ms`, `callback_duplicates` (1: every
status callback is posted twice), `callback_reorder` (1: the final status callback is posted
before the `sent` one).

Stdlib `ThreadingHTTPServer` speaking HTTP/1.1 keep-alive, chosen over uvicorn because a fault
must be able to close the TCP connection without any response, which ASGI cannot express.
"""

from __future__ import annotations

import base64
import bisect
import hmac
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
import urllib.request
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from twilio.request_validator import RequestValidator

from consumer.fake_twilio_callbacks import StatusCallbacks, callback_plan
from consumer.fake_twilio_faults import (
    CREATED_FAULTS,
    FAIL_FAULTS,
    FAULT_MODES,
    FaultBook,
    FaultError,
    FaultRule,
    Reply,
    error_reply,
    rejection,
    server_error_reply,
)
from consumer.fake_twilio_messages import (
    API_VERSION,
    DELIVERY_ERRORS,
    SERVICE_POOL_NUMBER,
    UNDELIVERABLE_TO,
    UNDELIVERED_ERROR,
    Received,
    list_filter,
    resource,
)
from consumer.segments import segments_of

__all__ = [
    "API_VERSION", "DELIVERY_ERRORS", "FAKE_ACCOUNT_SID", "FAKE_AUTH_TOKEN", "FAULT_MODES",
    "SERVICE_POOL_NUMBER", "UNDELIVERABLE_TO", "UNDELIVERED_ERROR", "FakeTwilio",
    "FakeTwilioControl", "FakeTwilioServer", "FaultError", "FaultRule", "Received", "Reply",
    "spawn",
]

log = logging.getLogger(__name__)

# Shaped as Twilio's (AC + 32 hex digits), so that code checking SIDs accepts it; the same
# account as the sandbox of scripts/run.sh and docker-compose.yml.
FAKE_ACCOUNT_SID = "AC" + "0" * 32
FAKE_AUTH_TOKEN = "fake-token"
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
                 deliver_delay_ms: float = 400, faults: list[FaultRule] | None = None,
                 callback_duplicates: bool = False, callback_reorder: bool = False) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self._expected_auth = "Basic " + base64.b64encode(
            f"{account_sid}:{auth_token}".encode()).decode()
        self.config = {"latency_ms": latency_ms, "jitter_ms": jitter_ms,
                       "send_delay_ms": send_delay_ms, "deliver_delay_ms": deliver_delay_ms,
                       "callback_duplicates": float(callback_duplicates),
                       "callback_reorder": float(callback_reorder)}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._created_seq = itertools.count(1)
        self._received: list[Received] = []
        self._by_sid: dict[str, Received] = {}
        self._by_to: dict[str, list[Received]] = defaultdict(list)
        self._faults = FaultBook(faults)
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
                     delay=fault.slow_ms / 1000 if mode == "slow" else 0.0,
                     drop=mode == "drop")

    def _count_fault(self, mode: str) -> None:
        with self._lock:
            self.stats[f"fault_{mode}"] += 1

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
        queued_ms = fault.hold_ms if mode == "hold" else self.config["send_delay_ms"]
        entry.sent_at = now + queued_ms / 1000
        entry.done_at = entry.sent_at + self.config["deliver_delay_ms"] / 1000
        if mode in FAIL_FAULTS:
            # Dropped from Twilio's queue when its turn came: it fails instead of being sent.
            entry.final_status, entry.final_error_code = "failed", FAIL_FAULTS[mode]
            entry.done_at = entry.sent_at
        elif entry.to == UNDELIVERABLE_TO:
            entry.final_status, entry.final_error_code = "undelivered", UNDELIVERED_ERROR

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
            extra = {"PageSize": page_size, "Page": number} | ({"PageToken": token} if token else {})
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
        refused = fake.account_refusal(path)  # creates meet their fault rules in create()
        if refused is not None:
            return refused
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
        if isinstance(reply.body, str):  # a proxy's error page
            content, content_type = reply.body.encode(), "text/html"
        else:
            content, content_type = json.dumps(reply.body).encode(), "application/json"
        head = [f"HTTP/1.1 {reply.status} {self.responses.get(reply.status, ('',))[0]}",
                f"Content-Type: {content_type}; charset=utf-8",
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
        `set_fault("429", count=3, retry_after=2)`, `set_fault("500", probability=0.1)` or
        `set_fault("20003", seconds=60)` (the account is broken for a minute)."""
        return self.set_faults([] if mode is None else [{"mode": mode, **options}])

    def set_faults(self, rules: list[dict]) -> list[dict]:
        return self._call("POST", "/_fake/faults", rules)["faults"]

    def faults(self) -> list[dict]:
        return self._call("GET", "/_fake/faults")["faults"]

    def configure(self, **settings: float) -> dict:
        """latency_ms, jitter_ms, send_delay_ms, deliver_delay_ms, callback_duplicates (0/1),
        callback_reorder (0/1); they apply to messages created afterwards."""
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
