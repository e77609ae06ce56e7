"""A small publisher for Python producers: one call, confirmed by the broker.

    from schemas.publish import publish
    publish({"body": "Your code is 482910", "sms": {"to_phone_number": "+14155550123"}})

The message is validated first, so a producer learns of a mistake at once instead of
finding it in the dead-letter queue.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pika

from schemas.message import Notification

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
# Per broker: a node that does not answer costs this long before the next is tried.
CONNECT_TIMEOUT = 5.0


def publish(
    message: Mapping[str, Any] | Notification,
    *,
    amqp_url: str = DEFAULT_AMQP_URL,
    exchange: str = "notifications",
    routing_key: str = "sms",
    default_region: str | None = None,
) -> uuid.UUID:
    """Publish one notification and wait for the broker's confirm; return its id."""
    return publish_many([message], amqp_url=amqp_url, exchange=exchange,
                        routing_key=routing_key, default_region=default_region)[0]


def publish_many(
    messages: Iterable[Mapping[str, Any] | Notification],
    *,
    amqp_url: str = DEFAULT_AMQP_URL,
    exchange: str = "notifications",
    routing_key: str = "sms",
    default_region: str | None = None,
) -> list[uuid.UUID]:
    """Publish several notifications on one connection, each confirmed; return their ids.

    `amqp_url` may list several brokers separated by commas: the first that answers is used.
    """
    connection = pika.BlockingConnection(broker_parameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        ids: list[uuid.UUID] = []
        for message in messages:
            notification = _validated(message, default_region)
            assert notification.id is not None  # _validated gives every message an id
            body = notification.model_dump_json(exclude_none=True).encode()
            # mandatory: an unroutable message (no queue bound yet) is an error, not a loss.
            channel.basic_publish(
                exchange, routing_key, body,
                pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=str(notification.id),
                ),
                mandatory=True,
            )
            ids.append(notification.id)
        return ids
    finally:
        connection.close()


def broker_parameters(amqp_url: str) -> list[pika.URLParameters]:
    """One URL, or several separated by commas (the nodes of a cluster), tried in turn."""
    urls = [url.strip() for url in amqp_url.split(",") if url.strip()]
    if not urls:
        raise ValueError("amqp_url names no broker")
    parameters = []
    for url in urls:
        params = pika.URLParameters(url)
        if "socket_timeout" not in url:
            params.socket_timeout = CONNECT_TIMEOUT
        parameters.append(params)
    return parameters


def _validated(message: Mapping[str, Any] | Notification, region: str | None) -> Notification:
    if isinstance(message, Notification):
        notification = message
    else:
        notification = Notification.model_validate(
            dict(message), context={"default_region": region}
        )
    if notification.id is None:
        notification = notification.model_copy(update={"id": uuid.uuid4()})
    return notification

