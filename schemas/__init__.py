"""The smsq message contract: pydantic models, the JSON Schema, and a Python publisher."""

from schemas.errors import InvalidMessage, parse_notification
from schemas.message import Notification, SmsPart, TemporaryMedia, derive_id

__all__ = [
    "InvalidMessage",
    "Notification",
    "SmsPart",
    "TemporaryMedia",
    "derive_id",
    "parse_notification",
]
