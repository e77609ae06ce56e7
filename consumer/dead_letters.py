"""What a dead letter is: the original message, unchanged, with headers that say why.

Written by ingest (a message that cannot be accepted), read by the operator commands and the
dashboard (`consumer/ops/dead_queue.py`). Contract: docs/contract.md (AMQP topology).
"""

from __future__ import annotations

from datetime import datetime, timezone

import pika

from schemas.message import derive_id

MAX_ERROR_HEADER = 1000  # characters of x-error; the reason comes first, so little is lost
# A dead letter carries its original headers unless they would make its properties larger
# than this: the content header must fit in one AMQP frame (128 KB by default), and the
# original ones came close enough to it that x-error might not fit too.
MAX_PROPERTIES_BYTES = 64 * 1024
# Headers smsq adds when dead-lettering; removed when a message is sent back.
SMSQ_HEADERS = ("x-error", "x-dead-lettered-at")


def properties_for(original: pika.BasicProperties, reason: str) -> pika.BasicProperties:
    """The properties of a dead letter: the original ones, with x-error saying why.

    The original headers are left out, and x-error says so, when they cannot be encoded
    again or would not fit in a frame: dead-lettering must never fail on them.
    """
    now = datetime.now(timezone.utc).isoformat()
    headers = {**(original.headers or {}), "x-error": reason[:MAX_ERROR_HEADER],
               "x-dead-lettered-at": now}
    properties = persistent_copy(original, headers)
    try:
        size = sum(len(piece) for piece in properties.encode())
        problem = f"{size} bytes" if size > MAX_PROPERTIES_BYTES else None
    except Exception as exc:  # noqa: BLE001 - whatever pika raises on a value it decoded
        problem = f"{type(exc).__name__}: {str(exc)[:100]}"
    if problem is None:
        return properties
    reason = f"{reason}; its original headers were left out ({problem})"
    return persistent_copy(original, {"x-error": reason[:MAX_ERROR_HEADER],
                                       "x-dead-lettered-at": now})


def persistent_copy(properties: pika.BasicProperties, headers: dict) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding,
        message_id=properties.message_id, correlation_id=properties.correlation_id,
        timestamp=properties.timestamp, app_id=properties.app_id, headers=headers,
        delivery_mode=pika.DeliveryMode.Persistent,
    )


def key_of(properties: pika.BasicProperties, body: bytes) -> str:
    """How operators name a dead letter: in `smsq dead`, the dashboard and the log."""
    return properties.message_id or str(derive_id(None, body))
