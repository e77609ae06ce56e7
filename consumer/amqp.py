"""The one module that knows pika: connections and the fixed AMQP topology.

Contract: docs/contract.md (section 2, AMQP topology).
"""

from __future__ import annotations

import pika
from pika.adapters.blocking_connection import BlockingChannel

from consumer.settings import Settings


def connection_parameters(settings: Settings, name: str) -> pika.URLParameters:
    params = pika.URLParameters(settings.amqp_url)
    params.client_properties = {"connection_name": f"smsq {name}"}
    if "heartbeat" not in settings.amqp_url:
        params.heartbeat = 30
    if "blocked_connection_timeout" not in settings.amqp_url:
        params.blocked_connection_timeout = 60
    return params


def connect(settings: Settings, name: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_parameters(settings, name))


def queue_arguments(settings: Settings) -> dict[str, object]:
    return {"x-queue-type": "quorum"} if settings.smsq_quorum_queues else {}


def declare_topology(channel: BlockingChannel, settings: Settings) -> None:
    """Exchange, queue, binding and dead-letter queue; idempotent, run at every start."""
    args = queue_arguments(settings)
    channel.exchange_declare(settings.smsq_exchange, exchange_type="topic", durable=True)
    channel.queue_declare(settings.smsq_queue, durable=True, arguments=args)
    channel.queue_bind(settings.smsq_queue, settings.smsq_exchange, settings.smsq_routing_key)
    channel.queue_declare(settings.dead_queue, durable=True, arguments=args)


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages ready in the queue and in the dead-letter queue (None: not declared yet)."""
    depths: dict[str, int | None] = {}
    connection = connect(settings, "status")
    try:
        for queue in (settings.smsq_queue, settings.dead_queue):
            channel = connection.channel()
            try:
                depths[queue] = channel.queue_declare(queue, passive=True).method.message_count
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                depths[queue] = None
    finally:
        connection.close()
    return depths
