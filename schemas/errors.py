"""Turn raw bytes into a Notification, or into one line that says what is wrong and where.

The line goes into the `x-error` header of a dead-lettered message, so it names the field
(`sms.to_phone_number`) and says the problem in words a person understands.
"""

from __future__ import annotations

import json
from collections.abc import Collection

import phonenumbers
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from schemas.json_rules import problem_in
from schemas.message import Notification


class InvalidMessage(ValueError):
    """The message cannot be accepted; str() is the reason for a person to read."""


_PLAIN_WORDS = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field (not part of the message format)",
    "timezone_aware": "needs a time zone, e.g. 2026-11-24T12:00:00Z",
    "string_type": "must be a string",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "list_type": "must be a list",
    "uuid_parsing": "must be a UUID, e.g. 0b9a3c1e-6f0d-4a51-9d57-2f0c6d3e9a11",
    "uuid_type": "must be a UUID, e.g. 0b9a3c1e-6f0d-4a51-9d57-2f0c6d3e9a11",
}


def parse_notification(raw: bytes, default_region: str | None = None) -> Notification:
    """Validate one message body; raise InvalidMessage with a reason naming the field."""
    try:
        notification = Notification.model_validate_json(
            raw, context={"default_region": default_region})
    except ValidationError as exc:
        # Looked for only now: decoding every valid message twice costs ingest time.
        _refuse_unless_utf8(raw)
        raise InvalidMessage(describe(exc, raw)) from None
    problem = problem_in(raw, notification)
    if problem is not None:
        raise InvalidMessage(problem)
    return notification


def country_of(e164: str) -> str:
    """The ISO 3166 code of the country a (valid, E.164) number belongs to, as phonenumbers
    says: `+14155550123` is US, `+14165550123` CA; `001` for non-geographic numbers."""
    return phonenumbers.region_code_for_number(phonenumbers.parse(e164)) or "unknown"


def country_refusal(notification: Notification, allowed: Collection[str]) -> str | None:
    """The reason to refuse a message whose recipient is not in an `allowed` country (an
    empty `allowed` allows all), naming the field and the country; None to accept it."""
    if not allowed:
        return None
    country = country_of(notification.sms.to_phone_number)
    if country in allowed:
        return None
    return (f"sms.to_phone_number: a number of {country}, not of an allowed country "
            f"(SMSQ_ALLOWED_COUNTRIES: {', '.join(sorted(allowed))})")


def _refuse_unless_utf8(raw: bytes) -> None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(
            f"message: not UTF-8 text (bad byte at position {exc.start})") from None


def describe(exc: ValidationError, raw: bytes = b"", names: dict[str, str] | None = None) -> str:
    """All problems of one message, most useful first, joined with '; '.

    `names` renames fields in the text, e.g. to the command-line flags that gave them.
    """
    return "; ".join(_describe_one(error, raw, names or {})
                     for error in exc.errors(include_url=False))


def _describe_one(error: ErrorDetails, raw: bytes, names: dict[str, str]) -> str:
    kind = error["type"]
    field = _shown(".".join(str(part) for part in error["loc"])) or "message"
    field = names.get(field, field)
    if kind == "json_invalid":
        return f"message: not valid JSON ({error['ctx'].get('error', 'parse error')})"
    if kind in ("model_type", "model_attributes_type") and field == "message":
        return f"message: must be a JSON object, got {_json_kind(raw)}"
    if kind == "literal_error" and field == "type":
        return f"type: only 'sms' is served, got {_shown(repr(error['input']))}"
    if kind == "literal_error":
        return (f"{field}: must be one of {error['ctx']['expected']}, "
                f"got {_shown(repr(error['input']))}")
    if kind == "string_too_long":  # the input may be a number, counted as its digits
        limit = error["ctx"]["max_length"]
        return f"{field}: at most {limit} characters, got {len(str(error['input']))}"
    if kind == "string_too_short":
        return f"{field}: must not be empty"
    if kind == "too_long":
        context = error["ctx"]
        return f"{field}: at most {context['max_length']} items, got {context['actual_length']}"
    if kind in ("datetime_parsing", "datetime_from_date_parsing"):
        return f"{field}: not a valid time ({error['ctx']['error']}), e.g. 2026-11-24T12:00:00Z"
    if kind == "value_error":
        return f"{field}: {error['msg'].removeprefix('Value error, ')}"
    words = _PLAIN_WORDS.get(kind)
    return f"{field}: {words or error['msg']}"


def _shown(text: str, limit: int = 80) -> str:
    """A value or field name as quoted in a reason: a huge one is cut, not repeated whole."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _json_kind(raw: bytes) -> str:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return "something else"
    names = {list: "an array", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)
