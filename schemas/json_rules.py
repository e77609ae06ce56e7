"""What pydantic's JSON parser lets through but a message must not carry.

pydantic reads NaN and Infinity (not JSON at all: RFC 8259 has no such numbers), turns a
number too large for a float (1e400) into infinity, keeps the last of a key given twice
(silently dropping the first, as an unknown field would be dropped without `extra=forbid`),
and decodes \\u0000 into a NUL character that Postgres cannot store in text. Numbers are
accepted for text fields (`"user_id": 42`), so NaN or 1e400 would become the text "NaN" or
"inf".

Looking for these with a second parser would double the cost of validation, so cheap
looks at the bytes and the values come first. Each key of a message written as most
producers write it is a quote followed by a colon (`"body":`), and unknown keys are refused,
so as many of those as fields pydantic saw means no key was given twice, unless the message
puts spaces between a key and its colon (a quote followed by a space: rare, looked at
closer). NaN, Infinity and numbers beyond a float end up as the texts "NaN", "inf" or
"-inf". Only a message that fails one of these looks (or has a `":` inside a text) is
parsed again, by the standard library, to say exactly what is wrong and where.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable

from schemas.message import Notification

# What pydantic makes of NaN, Infinity, -Infinity and 1e400 given for a text field.
_NON_FINITE_TEXTS = frozenset(("NaN", "inf", "-inf"))
# A key's quote followed by JSON whitespace, which may hide a key from the count.
_SPACED = re.compile(rb'"[ \t\n\r]')


class _Object(dict):
    """A JSON object, remembering a key it was given twice."""

    twice: str | None = None


class _NotJSONNumber(str):
    """NaN, Infinity or a number no float holds, where the message has it."""


def problem_in(raw: bytes, notification: Notification) -> str | None:
    """What is wrong with a message pydantic validated, or None; a reason that names the
    field, as `schemas.errors` words them."""
    if not _needs_a_closer_look(raw, notification):
        return None
    value = json.loads(raw, object_pairs_hook=_object, parse_constant=_NotJSONNumber,
                       parse_float=_float)
    return _first_problem(value, "")


def _needs_a_closer_look(raw: bytes, n: Notification) -> bool:
    media = n.sms.temporary_media
    keys = len(n.model_fields_set) + len(n.sms.model_fields_set) + (
        len(media.model_fields_set) if media is not None else 0)
    texts = (n.body, n.title, n.user_id, n.url, n.content_type, n.object_id,
             media.name if media is not None else None)
    return (raw.count(b'":') != keys or _SPACED.search(raw) is not None
            or b"\\u0000" in raw or not _NON_FINITE_TEXTS.isdisjoint(texts))


def _object(pairs: list[tuple[str, object]]) -> _Object:
    found = _Object(pairs)
    if len(found) < len(pairs):
        found.twice = _first_repeated(key for key, _ in pairs)
    return found


def _first_repeated(keys: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


def _float(text: str) -> float | _NotJSONNumber:
    number = float(text)
    return number if math.isfinite(number) else _NotJSONNumber(text)


def _first_problem(value: object, path: str) -> str | None:
    where = path or "message"
    if isinstance(value, _NotJSONNumber):
        return f"{where}: {value[:40]} is not a number JSON can carry"
    if isinstance(value, str):
        return f"{where}: contains a NUL character (\\u0000)" if "\0" in value else None
    if isinstance(value, _Object) and value.twice is not None:
        return f"{_join(path, value.twice)}: given twice (a key may appear only once)"
    items = value.items() if isinstance(value, dict) else enumerate(
        value if isinstance(value, list) else ())
    for key, inner in items:
        problem = _first_problem(inner, _join(path, str(key)))
        if problem is not None:
            return problem
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
