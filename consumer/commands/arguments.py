"""Parsing what operators type: notification ids and points in time."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta

from consumer.commands import UsageError

_DURATION = re.compile(r"(\d+)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def notification_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise UsageError(f"not a notification id (a UUID): {text!r}") from None


def since(text: str, now: datetime, flag: str = "--since") -> datetime:
    """'30m', '2h', '1d' ago, or an ISO 8601 time with its time zone."""
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{flag}: not a duration (30m, 2h, 1d) or an ISO time: {text!r}") from None
    if moment.tzinfo is None:
        raise UsageError(f"{flag}: give the time zone, e.g. {text}Z or {text}+02:00")
    return moment
