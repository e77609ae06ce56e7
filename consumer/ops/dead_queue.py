"""The dead-letter queue: see what was refused and why, and send it back after a fix.

Listing browses without consuming: messages are fetched unacknowledged and handed back
when the channel closes, so RabbitMQ puts them back where they were.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import pika
import pika.exceptions

from consumer import amqp
from consumer.dead_letters import SMSQ_HEADERS, key_of, persistent_copy
from consumer.settings import Settings

PREVIEW_CHARS = 200


@dataclass(frozen=True)
class DeadLetter:
    key: str  # the message_id, or a hash of the body for messages without one
    reason: str
    dead_lettered_at: str | None
    body: bytes

    @property
    def preview(self) -> str:
        text = self.body.decode("utf-8", errors="replace")
        return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"


def _as_dead_letter(properties: pika.BasicProperties, body: bytes) -> DeadLetter:
    headers = properties.headers or {}
    reason = headers.get("x-error") or _broker_reason(headers)
    at = headers.get("x-dead-lettered-at")
    return DeadLetter(key_of(properties, body), _text(reason), _text(at) if at else None, body)


def _broker_reason(headers: dict) -> str:
    """A message RabbitMQ dead-lettered itself (x-death), past the quorum queue's limit."""
    if _text(headers.get("x-first-death-reason", "")) == "delivery_limit":
        return (f"delivered {amqp.DELIVERY_LIMIT} times without being stored (RabbitMQ's "
                "delivery limit): see smsq consume's log for why")
    return "(no reason recorded)"


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def list_dead(settings: Settings, limit: int = 100) -> list[DeadLetter]:
    """The first `limit` dead letters, oldest first, left in the queue (none if it was
    never declared: looking creates nothing)."""
    found: list[DeadLetter] = []
    with amqp.connect(settings, "dead-letters") as connection:
        channel = connection.channel()
        try:
            while len(found) < limit:
                method, properties, body = channel.basic_get(settings.dead_queue, auto_ack=False)
                if method is None:
                    break
                found.append(_as_dead_letter(properties, body))
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:  # NOT_FOUND: no dead-letter queue yet
                raise
            return found
        # Closing the channel hands every unacknowledged message back to the queue.
        channel.close()
    return found


def requeue(settings: Settings, keys: Collection[str] | None = None) -> list[str]:
    """Send dead letters back to the main queue (all, or those whose key is given).

    Each one is published with a broker confirm before it is removed from the dead-letter
    queue, so a failure in between leaves a copy in both places, never in neither; smsq
    consume stores a redelivered id once. Returns the keys sent back.
    """
    sent_back = []
    with amqp.connect(settings, "dead-letters") as connection:
        channel = connection.channel()
        amqp.declare_topology(channel, settings)
        channel.confirm_delivery()
        # Only what is there now: a message that fails again must not loop forever here.
        waiting = channel.queue_declare(settings.dead_queue, passive=True).method.message_count
        for _ in range(waiting):
            method, properties, body = channel.basic_get(settings.dead_queue, auto_ack=False)
            if method is None:
                break
            key = key_of(properties, body)
            if keys is not None and key not in keys:
                continue  # left unacknowledged: returned to the queue when the channel closes
            channel.basic_publish("", settings.smsq_queue, body, _without_smsq_headers(properties),
                                  mandatory=True)
            channel.basic_ack(method.delivery_tag)
            sent_back.append(key)
        channel.close()
    return sent_back


def _without_smsq_headers(properties: pika.BasicProperties) -> pika.BasicProperties:
    headers = {k: v for k, v in (properties.headers or {}).items() if k not in SMSQ_HEADERS}
    requeued = headers.get("x-smsq-requeued", 0)
    headers["x-smsq-requeued"] = (requeued if isinstance(requeued, int) else 0) + 1
    return persistent_copy(properties, headers)

