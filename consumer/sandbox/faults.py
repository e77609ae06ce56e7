"""The faults `smsq fake-twilio` can inject, and the answers it gives when something is wrong.

A rule (`FaultRule`) names a mode (see `consumer.sandbox` for the list and what each does)
and which message creations it hits: those to `to` / from `sender` when set, the next `count`
(None: all), each with `probability`, until `seconds` after it was set (None: no end).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields

# Answered with an error; nothing is created. (HTTP status, Twilio code, Twilio message.)
REJECT_FAULTS = {
    "429": (429, 20429, "Too Many Requests"),
    "500": (500, 20500, "An internal server error has occurred"),
    "503": (503, 20503, "Service Unavailable"),
    "21611": (400, 21611, "This 'From' number has exceeded the maximum number of queued "
                          "messages"),
    # Account-wide: a revoked token or a suspended account answers every request with this
    # (Twilio's message for it is just "Authenticate").
    "20003": (401, 20003, "Authenticate"),
    "20404": (404, 20404, "The requested resource {path} was not found"),
    # Twilio's error page does not say which HTTP status comes with 63038; accounts that hit it
    # report 429 (twilio/twilio-php#661), with the message "Account AC... exceeded the 500 daily
    # messages limit". The fake uses 429 and the page's title.
    "63038": (429, 63038, "Account exceeded the daily messages limit"),
}
# What a proxy in front of Twilio answers (a short HTML page, not Twilio's JSON).
PROXY_ERRORS = {502: "Bad Gateway", 504: "Gateway Time-out"}
REJECT_FAULTS_BY_PROXY = {str(status): status for status in PROXY_ERRORS}
# The message IS created (stored, listed, its callbacks posted), but the answer is this status.
CREATED_FAULTS = {f"created-{status}": status for status in (500, 502, 503, 504)}
# Accepted, then the message ends `failed` with this error code instead of being delivered.
FAIL_FAULTS = {"fail-30001": 30001, "fail-30022": 30022}
# Conditions of the whole account: while such a rule (without to / sender) is on, fetch and list
# answer the same error as create does (without using up its count).
ACCOUNT_FAULTS = frozenset({"20003", "20404"})
# slow: accepted, answered after slow_ms. drop: accepted, then the connection is closed without
# an answer. drop-unrecorded: closed without an answer and NOT accepted (lost on the way in).
# hold: accepted, but it stays queued (date_sent null) for hold_ms before it is sent.
FAULT_MODES = (frozenset(REJECT_FAULTS) | frozenset(REJECT_FAULTS_BY_PROXY)
               | frozenset(CREATED_FAULTS) | frozenset(FAIL_FAULTS)
               | {"slow", "drop", "drop-unrecorded", "hold"})


class FaultError(ValueError):
    """A fault description that does not make sense."""


@dataclass
class FaultRule:
    """Applies to message creations matching `to` / `sender` (when set): the next `count` of
    them (None: all), each with `probability`, for `seconds` after it was set (None: no end)."""

    mode: str
    count: int | None = None
    probability: float = 1.0
    retry_after: float = 1.0  # seconds, sent as Retry-After with "429"
    slow_ms: float = 30_000.0  # how late "slow" answers
    hold_ms: float = 60_000.0  # how long "hold" keeps the message queued
    seconds: float | None = None  # the rule ends this long after it was set, whatever its count
    to: str | None = None
    sender: str | None = None
    expires_at: float | None = field(default=None, init=False, compare=False)  # epoch seconds

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise FaultError(f"unknown fault mode {self.mode!r}; one of {sorted(FAULT_MODES)}")
        if self.count is not None and self.count < 1:
            raise FaultError("count must be at least 1")
        if not 0 < self.probability <= 1:
            raise FaultError("probability must be in (0, 1]")
        for name in ("retry_after", "slow_ms", "hold_ms"):
            if getattr(self, name) < 0:
                raise FaultError(f"{name} must not be negative")
        if self.seconds is not None:
            if self.seconds <= 0:
                raise FaultError("seconds must be above 0")
            self.expires_at = time.time() + self.seconds

    @classmethod
    def from_dict(cls, spec: dict) -> FaultRule:
        known = {f.name for f in fields(cls) if f.init}
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
            if key in ("to", "sender"):
                spec[key] = value
            else:
                number = float(value)
                spec[key] = int(number) if key == "count" else number
        return cls.from_dict(spec)

    @property
    def account_wide(self) -> bool:
        return self.mode in ACCOUNT_FAULTS and self.to is None and self.sender is None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def matches(self, to: str, sender: str) -> bool:
        return self.to in (None, to) and self.sender in (None, sender) and self.strikes()

    def strikes(self) -> bool:
        return self.probability >= 1 or random.random() < self.probability


class FaultBook:
    """The rules in force, in order; the first that matches a creation applies. Thread-safe."""

    def __init__(self, rules: list[FaultRule] | None = None) -> None:
        self._lock = threading.Lock()
        self._rules = list(rules or [])

    def replace(self, rules: list[FaultRule]) -> None:
        with self._lock:
            self._rules = list(rules)

    def take(self, to: str, sender: str) -> FaultRule | None:
        """The rule for one message creation, counted against its `count`."""
        with self._lock:
            self._forget_expired()
            for rule in self._rules:
                if rule.matches(to, sender):
                    if rule.count is not None:
                        rule.count -= 1
                        if rule.count == 0:
                            self._rules.remove(rule)
                    return rule
        return None

    def account_fault(self) -> FaultRule | None:
        """An account-wide rule in force, which fetch and list answer too (count untouched)."""
        with self._lock:
            self._forget_expired()
            return next((rule for rule in self._rules if rule.account_wide and rule.strikes()),
                        None)

    def as_dicts(self) -> list[dict]:
        with self._lock:
            self._forget_expired()
            return [asdict(rule) for rule in self._rules]

    def _forget_expired(self) -> None:
        now = time.time()
        self._rules = [rule for rule in self._rules if not rule.expired(now)]


@dataclass
class Reply:
    status: int
    body: dict | str | None  # JSON; a str is an HTML page (a proxy's); None with drop=True
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (beyond the configured latency)
    drop: bool = False  # close the connection without any answer

    @property
    def error_code(self) -> int | None:
        """The Twilio error code answered, if any."""
        if self.status >= 400 and isinstance(self.body, dict):
            return self.body.get("code")
        return None


def error_reply(status: int, code: int, message: str, **headers: str) -> Reply:
    """Twilio's legacy error body, which twilio-python turns into TwilioRestException."""
    return Reply(status, {"code": code, "message": message,
                          "more_info": f"https://www.twilio.com/docs/errors/{code}",
                          "status": status}, headers)


def proxy_reply(status: int) -> Reply:
    """A gateway's error page (nginx's shape), as when a proxy in front of Twilio gives up."""
    title = f"{status} {PROXY_ERRORS[status]}"
    return Reply(status, f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
                         f"<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n")


def server_error_reply(status: int) -> Reply:
    """A 5xx as Twilio (500, 503) or the proxy in front of it (502, 504) answers it."""
    if status in PROXY_ERRORS:
        return proxy_reply(status)
    return error_reply(*REJECT_FAULTS[str(status)])


def rejection(rule: FaultRule, path: str) -> Reply | None:
    """The error answer of a rule whose mode creates nothing; None for the other modes."""
    if rule.mode in REJECT_FAULTS_BY_PROXY:
        return proxy_reply(REJECT_FAULTS_BY_PROXY[rule.mode])
    if rule.mode not in REJECT_FAULTS:
        return None
    status, code, message = REJECT_FAULTS[rule.mode]
    headers = {"Retry-After": f"{rule.retry_after:g}"} if code == 20429 else {}
    return error_reply(status, code, message.format(path=path), **headers)
