"""`smsq queues migrate`: turn smsq's queues into the kind configured, without losing a message.

RabbitMQ cannot change a queue's kind (classic or quorum) or arguments in place: the queue
must be deleted and declared again. Its messages are moved out first and back afterwards,
each one published with a publisher confirm before it is acknowledged at its source, so a
crash at any point leaves a message in one queue or in two (smsq consume stores an id once),
never in none. For each queue Q (the dead-letter queue, then the main queue):

  1. declare Q.migrating as Q will be and bind it like Q, then unbind Q: from now on what
     producers publish to the exchange lands in Q.migrating
  2. move Q's messages into Q.migrating; delete Q once it is empty
  3. declare Q anew, bind it, unbind Q.migrating
  4. move Q.migrating's messages into Q; delete Q.migrating once it is empty

A queue is deleted only after a look that found it empty, and nothing routes to it any more
by then (quorum queues refuse RabbitMQ's own delete-if-empty). Run again after a crash, it
resumes: a Q of the old kind starts at 1 again, a missing Q is declared anew, a Q.migrating
left over is emptied into Q; run it until it succeeds before starting consume again.
Consumers must be stopped (the command refuses while Q has any); producers may go on
publishing to the exchange. A message published straight to Q through the default exchange
(as RabbitMQ's management UI does) between the last look and the delete would be lost: pause
that kind of publishing for the minute the command runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pika
import pika.exceptions

from consumer import amqp
from consumer.settings import ConfigError, Settings

log = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".migrating"
# Set by RabbitMQ on each delivery from a quorum queue; not part of the message.
BROKER_HEADERS = ("x-delivery-count",)


@dataclass(frozen=True)
class Migration:
    queue: str
    migrated: bool  # False: already declared as configured, nothing moved
    moved_out: int
    moved_back: int


def migrate_queues(settings: Settings) -> list[Migration]:
    with amqp.connect(settings, "queues migrate") as connection:
        setup = connection.channel()
        setup.exchange_declare(settings.smsq_exchange, exchange_type="topic", durable=True)
        version = amqp.broker_version(setup)
        main = QueueMove(connection, settings, settings.smsq_queue,
                         amqp.queue_arguments(settings), bound=True)
        dead = QueueMove(connection, settings, settings.dead_queue,
                         amqp.dead_queue_arguments(settings, version), bound=False)
        return [dead.run(), main.run()]


class QueueMove:
    def __init__(self, connection: pika.BlockingConnection, settings: Settings, queue: str,
                 arguments: dict[str, object], bound: bool) -> None:
        self.connection, self.settings = connection, settings
        self.queue, self.arguments, self.bound = queue, arguments, bound
        self.temporary = queue + TEMPORARY_SUFFIX

    def run(self) -> Migration:
        moved_out = 0
        already = self._declared_as_configured()
        if not already:
            self._refuse_while_consumed()
            self._declare(self.temporary)
            self._bind(self.temporary)
            self._unbind(self.queue)
            moved_out = self._empty_and_delete(self.queue, self.temporary)
            self._declare(self.queue)
        elif not self._exists(self.temporary):
            return Migration(self.queue, migrated=False, moved_out=0, moved_back=0)
        # Q as configured (new, or left so by a run that crashed) and Q.migrating to empty.
        self._bind(self.queue)
        self._unbind(self.temporary)
        moved_back = self._empty_and_delete(self.temporary, self.queue)
        return Migration(self.queue, migrated=True, moved_out=moved_out, moved_back=moved_back)

    # -- steps ------------------------------------------------------------------------------

    def _declared_as_configured(self) -> bool:
        """Declare Q as configured: True if that worked (Q was so, or did not exist)."""
        channel = self.connection.channel()
        try:
            channel.queue_declare(self.queue, durable=True, arguments=self.arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED: Q exists, declared otherwise
                raise
            return False
        channel.close()
        return True

    def _refuse_while_consumed(self) -> None:
        consumers = self._passive(self.queue).method.consumer_count
        if consumers:
            raise ConfigError(f"queue {self.queue!r} has {consumers} consumer(s): stop every "
                              "smsq consume first, then run `smsq queues migrate` again")

    def _declare(self, queue: str) -> None:
        channel = self.connection.channel()
        amqp.declare_queue(channel, self.settings, queue, self.arguments)
        channel.close()

    def _bind(self, queue: str) -> None:
        if self.bound:
            self._on_a_channel("queue_bind", queue, self.settings.smsq_exchange,
                               self.settings.smsq_routing_key)

    def _unbind(self, queue: str) -> None:
        if self.bound:
            self._on_a_channel("queue_unbind", queue, self.settings.smsq_exchange,
                               self.settings.smsq_routing_key)

    def _on_a_channel(self, operation: str, *args):
        """One operation on a channel of its own: a refusal closes that channel only."""
        channel = self.connection.channel()
        result = getattr(channel, operation)(*args)
        channel.close()
        return result

    def _empty_and_delete(self, source: str, target: str) -> int:
        """Move source's messages into target until a look finds it empty, then delete it."""
        moved = move_messages(self.connection, source, target)
        while self._passive(source).method.message_count:
            moved += move_messages(self.connection, source, target)
        self._on_a_channel("queue_delete", source)
        log.info("queue emptied and deleted", extra={
                "action": "queue_migration_step", "queue": source, "into": target,
            "moved": moved})
        return moved

    def _exists(self, queue: str) -> bool:
        try:
            self._passive(queue)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            return False
        return True

    def _passive(self, queue: str):
        return self._on_a_channel("queue_declare", queue, True)


def move_messages(connection: pika.BlockingConnection, source: str, target: str) -> int:
    """Each message of source published to target, confirmed, then acknowledged at source.

    A crash between the confirm and the acknowledgement leaves the message in both queues;
    a message the broker refuses (nack, unroutable) stays unacknowledged in source.
    """
    taking = connection.channel()
    putting = connection.channel()
    putting.confirm_delivery()
    moved = 0
    while True:
        method, properties, body = taking.basic_get(source, auto_ack=False)
        if method is None:
            break
        putting.basic_publish("", target, body, _as_published(properties), mandatory=True)
        taking.basic_ack(method.delivery_tag)
        moved += 1
    taking.close()
    putting.close()
    return moved


def _as_published(properties: pika.BasicProperties) -> pika.BasicProperties:
    headers = properties.headers
    if headers:
        properties.headers = {k: v for k, v in headers.items() if k not in BROKER_HEADERS}
    return properties
