"""Query, form and path parameters of the dashboard, checked where they are read: a
malformed one is answered 400 naming it, never 500 from deeper down (Postgres refusing a
NUL byte, an integer out of range, int() of a superscript digit)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

MAX_TEXT = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# ASCII digits only ('²'.isdigit() is true), and few enough for Postgres' integer.
_ERROR_CODE = re.compile(r"[0-9]{1,9}")


class BadParameter(ValueError):
    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name


def text(values: Mapping, name: str, max_length: int = MAX_TEXT) -> str:
    """The parameter as one line of text ('' when absent)."""
    value = values.get(name, "")
    if not isinstance(value, str):
        raise BadParameter(name, "must be text, not a file")
    if len(value) > max_length:
        raise BadParameter(name, f"at most {max_length} characters")
    if _CONTROL.search(value):
        raise BadParameter(name, "must not contain control characters")
    return value


def texts(values: ImmutableMultiDict, name: str) -> list[str]:
    """Every value of a repeated parameter (`id=...&id=...`), each checked as text()."""
    return [text({name: value}, name) for value in values.getlist(name)]


def error_code_filter(values: Mapping, name: str = "code") -> tuple[int | None, bool]:
    """`30003` -> (30003, False); `none` -> (None, True); absent or empty -> (None, False)."""
    raw = text(values, name)
    if raw in ("", "none"):
        return None, raw == "none"
    if not _ERROR_CODE.fullmatch(raw):
        raise BadParameter(name, "must be a Twilio error code (digits, e.g. 30003) or 'none'")
    return int(raw), False


def notification_id(raw: str, name: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise BadParameter(name, f"not a notification id (a UUID): {raw[:40]!r}") from None


async def bad_parameter(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"{exc}\n", status_code=400)
