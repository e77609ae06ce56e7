"""Logging: one line per event, an `action` name on each, JSON on request, numbers masked.

Callers log with `extra={"action": "...", "notification_id": ...}` so operators filter on a
name, not on text. Phone numbers are masked in every line whatever logged them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

# What may be a phone number: digits in groups separated by one space or hyphen (a group may
# stand in parentheses), with or without a leading '+', not part of a longer token (an id, a
# UUID, a decimal, an address, a time). _masked decides by the number of digits.
_PHONE = re.compile(r"""
    (?<![\w.:/+-])                  # not inside a token
    (?!\d{4}-\d\d-\d\d)              # an ISO date is not a number
    \+?\(?\d+\)?(?:[ -]\(?\d+\)?)*
    (?![\w.:/-])
""", re.VERBOSE)
MIN_DIGITS_WITH_PLUS = 7  # E.164: 7 to 15 digits after '+'
MIN_DIGITS_WITHOUT = 8  # national numbers (4155550123); fewer would mask counts and codes
MAX_DIGITS = 15
# A field or message longer than this is cut (a reason quoting a 20,000-character field
# name must not make a 20,000-character line).
MAX_VALUE_CHARS = 1000
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def some_ids(ids: list, at_most: int) -> str:
    """Ids for one log line: the first `at_most`, and how many more."""
    more = len(ids) - at_most
    return " ".join(str(i) for i in ids[:at_most]) + (f" and {more} more" if more > 0 else "")


def mask_phone(text: str) -> str:
    """Every digit of a phone number but the last 4 masked: +1 415 555 0123 -> +* *** *** 0123."""
    return _PHONE.sub(_masked, text)


def _masked(match: re.Match) -> str:
    found = match.group(0)
    digits = sum(c.isdigit() for c in found)
    least = MIN_DIGITS_WITH_PLUS if found.startswith("+") else MIN_DIGITS_WITHOUT
    if not least <= digits <= MAX_DIGITS:
        return found
    to_mask = digits - 4
    masked = []
    for c in found:
        if c.isdigit() and to_mask > 0:
            masked.append("*")
            to_mask -= 1
        else:
            masked.append(c)
    return "".join(masked)


def capped(value: object) -> object:
    """Long text cut to MAX_VALUE_CHARS, saying how much was left out."""
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return f"{value[:MAX_VALUE_CHARS]}... ({len(value) - MAX_VALUE_CHARS} more characters)"
    return value


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: capped(v) for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": capped(record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return mask_phone(json.dumps(line, default=str))


def _one_line(value: object) -> str:
    """Field values keep the event on one line (psycopg's errors carry a hint on a second)."""
    return " ".join(part.strip() for part in str(value).splitlines())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={_one_line(v)}" for k, v in _fields(record).items())
        stamp = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp} {record.levelname:<7} {capped(record.getMessage())}"
        if fields:
            line += f" [{fields}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return mask_phone(line)


def name_the_action(record: logging.LogRecord) -> bool:
    """A line from a library (uvicorn, pika, ...) gets its logger's name as its action, so
    every line can be filtered on one."""
    if not getattr(record, "action", None):
        record.action = record.name
    return True


def setup_logging(log_format: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(name_the_action)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter (every pika frame, every HTTP request) is not an smsq event.
    # uvicorn's lifecycle lines repeat smsq serve's own serve_start / serve_stopped events.
    for noisy in ("pika", "twilio.http_client", "urllib3", "httpx", "uvicorn.access",
                  "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A passive declare of a missing queue (smsq status) closes a channel: expected, not news.
    logging.getLogger("pika.channel").setLevel(logging.ERROR)
    # pika logs each failed connection attempt as seven errors and a traceback; smsq logs
    # one line per attempt itself, with the cause (error_text).
    logging.getLogger("pika.adapters").setLevel(logging.CRITICAL)


def error_text(exc: BaseException) -> str:
    """'Class: message' of the innermost cause: pika wraps it in exceptions without text
    (in args, or in `.exception` for a failed phase of its connection workflow)."""
    while True:
        inner = getattr(exc, "exception", None) or (exc.args[0] if exc.args else None)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
