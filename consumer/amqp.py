"""The one module that knows pika: connections and the fixed AMQP topology.

Contract: docs/contract.md (section 2, AMQP topology).
"""

from __future__ import annotations

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from consumer.settings import ConfigError, Settings

# Per broker of AMQP_URL, unless its URL says otherwise: the TCP connect, and the whole
# handshake. A broker that does not answer costs that much before the next one is tried.
CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0


def url_parameters(url: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    if "socket_timeout" not in url:
        params.socket_timeout = CONNECT_TIMEOUT
    if "stack_timeout" not in url:
        params.stack_timeout = HANDSHAKE_TIMEOUT
    return params


def connection_parameters(settings: Settings, name: str,
                          first: int = 0) -> list[pika.URLParameters]:
    """One parameter set per broker of AMQP_URL, starting with the `first`-th (wrapping
    round): pika tries them in that order, once each, and takes the first that answers."""
    urls = settings.amqp_urls
    ordered = urls[first % len(urls):] + urls[:first % len(urls)]
    return [_program_parameters(url, name) for url in ordered]


def _program_parameters(url: str, name: str) -> pika.URLParameters:
    params = url_parameters(url)
    params.client_properties = {"connection_name": f"smsq {name}"}
    if "heartbeat" not in url:
        params.heartbeat = 30
    if "blocked_connection_timeout" not in url:
        params.blocked_connection_timeout = 60
    return params


def connect(settings: Settings, name: str, first: int = 0) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_parameters(settings, name, first))


def broker_of(connection: pika.BlockingConnection) -> str:
    """host:port of the broker a connection reached, for logs."""
    params = connection._impl.params  # noqa: SLF001 - pika keeps the set it connected with
    return f"{params.host}:{params.port}"


def broker_index(settings: Settings, connection: pika.BlockingConnection) -> int:
    """Where in AMQP_URL's list the broker a connection reached stands (0 if not found)."""
    reached = broker_of(connection)
    for index, url in enumerate(settings.amqp_urls):
        params = pika.URLParameters(url)
        if f"{params.host}:{params.port}" == reached:
            return index
    return 0


# Deliveries of one message on a quorum queue before RabbitMQ gives up on it. Each crash or
# lost connection of a consumer holding it counts one; past the limit the message goes to
# the dead-letter queue (RabbitMQ 4 would drop it without a dead-letter exchange).
DELIVERY_LIMIT = 20


class QueueMismatch(ConfigError):
    """A queue exists with other arguments (another kind) than smsq declares."""


def queue_arguments(settings: Settings) -> dict[str, object]:
    """The main queue's: quorum unless SMSQ_QUORUM_QUEUES=false, dead-lettering past the
    delivery limit into the dead-letter queue (through the default exchange)."""
    if not settings.smsq_quorum_queues:
        return {}
    return {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": settings.dead_queue}


def dead_queue_arguments(settings: Settings, broker_version: str) -> dict[str, object]:
    """The dead-letter queue's: never a delivery limit, since browsing it (`smsq dead`)
    hands every message back, and each return counts as a delivery. RabbitMQ 4 sets a
    limit of 20 by default, -1 lifts it; RabbitMQ 3 has none, and takes -1 as zero."""
    if not settings.smsq_quorum_queues:
        return {}
    args: dict[str, object] = {"x-queue-type": "quorum"}
    if _major(broker_version) >= 4:
        args["x-delivery-limit"] = -1
    return args


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def broker_version(channel: BlockingChannel) -> str:
    properties = channel.connection._impl.server_properties  # noqa: SLF001 - pika keeps them
    version = properties.get("version", "")
    return version.decode() if isinstance(version, bytes) else str(version)


def declare_topology(channel: BlockingChannel, settings: Settings) -> None:
    """Exchange, queue, binding and dead-letter queue; idempotent, run at every start.

    A queue declared before with other arguments (classic where quorum is configured, or
    the reverse) stops this with QueueMismatch: one line naming the queue and the cure.
    """
    channel.exchange_declare(settings.smsq_exchange, exchange_type="topic", durable=True)
    declare_queue(channel, settings, settings.smsq_queue, queue_arguments(settings))
    channel.queue_bind(settings.smsq_queue, settings.smsq_exchange, settings.smsq_routing_key)
    declare_queue(channel, settings, settings.dead_queue,
                  dead_queue_arguments(settings, broker_version(channel)))


def declare_queue(channel: BlockingChannel, settings: Settings, queue: str,
                  arguments: dict[str, object]) -> None:
    try:
        channel.queue_declare(queue, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED: the queue exists, declared otherwise
            raise
        kind = "quorum" if settings.smsq_quorum_queues else "classic"
        said = str(exc.reply_text).removeprefix("PRECONDITION_FAILED - ")
        raise QueueMismatch(
            f"queue {queue!r} exists with other arguments than a {kind} queue as smsq "
            f"declares it (SMSQ_QUORUM_QUEUES={str(settings.smsq_quorum_queues).lower()}; "
            f"RabbitMQ: {said}): run `smsq queues migrate` to move its messages into a "
            f"new {kind} queue") from None


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
