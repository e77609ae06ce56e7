"""`smsq consume`: RabbitMQ -> validate -> Postgres, in batches, acknowledged after commit.

Threads, each owning its connection:

- the pika thread (the caller's) owns the AMQP connection. It consumes with a bounded
  prefetch (its deliveries read by `consumer.ingest.delivery_reader`, at a fraction of pika's
  cost), validates each delivery as it arrives, gathers deliveries into a batch and hands
  the batch to the writers. Once a batch and every batch before it are committed, this
  thread publishes the batch's dead letters (confirmed by the broker) and then
  acknowledges the whole batch with one `basic_ack(multiple=True)`.
- SMSQ_INGEST_WRITERS writer threads, each with a database connection of its own, store
  batches side by side (one commits while the next is copied in), retrying through a
  Postgres outage.

So pika keeps reading while Postgres commits (psycopg releases the GIL while it waits),
and pika is only ever touched from its own thread: a writer merely wakes it with
`add_callback_threadsafe`. Nothing is acknowledged before it is
committed or dead-lettered, and nothing is acknowledged on a channel other than the one it
came from: after a reconnect the broker redelivers, and the ids make a second store a no-op.

A batch is handed over when it holds SMSQ_INGEST_BATCH_SIZE messages (or MAX_BATCH_BYTES of
them), when it is SMSQ_INGEST_BATCH_MS old, or at once when the queue has run dry and no
writer is busy, so a lone message is not delayed.

Memory is bounded in bytes as well as in messages: the prefetch counts messages, and a
message may carry 5 MB of inline media. Holding MAX_HELD_BYTES unacknowledged, the pika
thread stops reading until a writer has stored a batch: what the broker sends meanwhile
waits in the socket and the broker (TCP's own backpressure). Not a cancel: cancelling hands
back everything the broker has already sent, up to the whole prefetch, only to have it
delivered again, and a quorum queue drops a message redelivered too often. While the
writer is stuck (Postgres away), the thread still looks at the connection every
HELD_WAKE_SECONDS for its heartbeats, and each look may read up to 100 KB more (pika's
read per look): the bound creeps by that much, about 24 MB an hour, up to the prefetch.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import deque
from uuid import UUID, uuid4

import phonenumbers
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import BaseModel

from consumer import amqp, dead_letters, metrics, reconnect
from consumer.ingest import storage
from consumer.ingest.delivery_reader import DeliveryReader
from consumer.ingest.senders import sender_for
from consumer.ingest.writer import Batch, BatchWriter, Delivery, Outcome
from consumer.logs import error_text
from consumer.settings import Settings
from consumer.signals import StopSignal
from schemas.errors import InvalidMessage, country_of, country_refusal, parse_notification
from schemas.message import Notification, derive_id

log = logging.getLogger(__name__)

IDLE_WAKE_SECONDS = 1.0  # how long an idle loop blocks before looking at the stop flag
# Holding too much, the loop still looks at the connection this often, for its heartbeats
# (pika sends one every half of the broker's timeout, 30 s by default). Each look may read
# up to 100 KB more, so no more often than that needs.
HELD_WAKE_SECONDS = 15.0
# Bodies held unacknowledged, at most (plus one message): past it, reading pauses.
MAX_HELD_BYTES = 32 * 2**20
MAX_BATCH_BYTES = 8 * 2**20  # one transaction's bodies, at most (plus one message)


# What a reconnect cures: the connection, its socket, or the channel under it went away.
AMQP_CONNECTION_LOST = (pika.exceptions.AMQPConnectionError,
                        pika.exceptions.ChannelWrongStateError, ConnectionError)


class ConsumerCancelled(ConnectionError):
    """The broker cancelled our consumer: its queue was deleted (from the management UI,
    say), or the node holding it went away. Cured like a lost connection: reconnecting
    declares the queue again and consumes from it."""


class FatalBrokerError(Exception):
    """The broker refused us for a reason a reconnect will not fix (credentials, arguments)."""


class Ingester:
    def __init__(self, settings: Settings, stop: StopSignal) -> None:
        self.settings = settings
        self.stop = stop
        self.senders = settings.extra_senders
        self.allowed_countries = settings.allowed_countries
        self.batch_size = settings.smsq_ingest_batch_size
        self.batch_seconds = settings.smsq_ingest_batch_ms / 1000
        self.writer = BatchWriter(settings, stop, on_done=self._wake_for)
        self.batch: Batch | None = None
        self.in_flight: deque[Batch] = deque()  # handed to the writers, not yet acknowledged
        # Handed to the writers on a connection since lost: still in memory until stored.
        self.orphaned: list[Batch] = []
        self.arrived = 0  # deliveries since the loop last looked; 0 means the queue ran dry
        self.batch_done = threading.Event()  # set by a writer after each batch
        self.amqp_connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.dead_channel: BlockingChannel | None = None
        self.reader: DeliveryReader | None = None  # None: pika hands us the deliveries
        self.acks_withheld = False  # a batch of this connection was given up
        self.consumer_tag = ""
        # AMQP_URL's broker to try first at the next connect: the one after the broker last
        # reached, so a node that went away is tried last, not waited for first.
        self.next_broker = 0

    # -- the outer loop: connect, consume, reconnect -----------------------------------------

    def run(self) -> None:
        self.writer.start()
        try:
            while not self.stop.requested:
                try:
                    if self._connect():
                        self._consume()
                except AMQP_CONNECTION_LOST as exc:
                    log.warning("rabbitmq connection lost", extra={
                        "action": "rabbitmq_lost", "error": error_text(exc)})
                finally:
                    self._close_amqp()
        finally:
            self.stop.request()  # however the loop ended, the writers must not retry forever
            self.writer.close()
        log.info("consumer stopped", extra={"action": "consume_stopped"})

    def _connect(self) -> bool:
        """Connect, retrying with a growing backoff (from the start each time); False if stopped."""
        return reconnect.until_connected("rabbitmq", self.stop, AMQP_CONNECTION_LOST, log,
                                         self._open_amqp)

    def _consume(self) -> None:
        log.info("consuming", extra={"action": "consume_started",
                                     "queue": self.settings.smsq_queue,
                                     "broker": amqp.broker_of(self.amqp_connection)})
        while not self.stop.requested:
            if self._holding_too_much():
                self._wait_for_the_writer()
                continue
            self.arrived = 0
            self._process_events(self._wait_seconds())
            if self.batch is not None and self._batch_is_due():
                self._hand_over()
        self._finish()

    @property
    def held_bytes(self) -> int:
        """Bodies in memory not yet acknowledged: the batch being gathered, those handed to
        the writers, and those handed over on a connection since lost and not yet stored."""
        gathering = self.batch.body_bytes if self.batch is not None else 0
        return (gathering + sum(batch.body_bytes for batch in self.in_flight)
                + sum(batch.body_bytes for batch in self._orphans_waiting()))

    def _orphans_waiting(self) -> list[Batch]:
        return [batch for batch in self.orphaned if batch.outcome is Outcome.WAITING]

    def _holding_too_much(self) -> bool:
        """MAX_HELD_BYTES or more in memory, and the writers busy with some of it."""
        writer_busy = self.in_flight or self._orphans_waiting()
        return bool(writer_busy) and self.held_bytes >= MAX_HELD_BYTES

    def _wait_for_the_writer(self) -> None:
        """Holding too many bytes: read nothing until a writer has stored a batch, then
        run its acknowledgement (and send heartbeats, at least every HELD_WAKE_SECONDS)."""
        self.batch_done.wait(HELD_WAKE_SECONDS)
        self.batch_done.clear()
        self._process_events(0)

    def _process_events(self, time_limit: float) -> None:
        """Let pika read, write and run callbacks; then take what the reader has read."""
        assert self.amqp_connection is not None  # the loop runs while connected
        self.amqp_connection.process_data_events(time_limit=time_limit)
        self._take_from_reader()

    def _take_from_reader(self) -> None:
        if self.reader is not None:
            for tag, _redelivered, properties, body in self.reader.take():
                self._take(tag, properties, body)

    def _wait_seconds(self) -> float:
        if self.batch is None:
            return IDLE_WAKE_SECONDS
        if not self.in_flight:
            return 0  # look once: if nothing came, the queue ran dry and no writer is busy
        return max(0.0, self.batch_seconds - self.batch.age_seconds())

    def _batch_is_due(self) -> bool:
        assert self.batch is not None  # asked only while gathering one
        ran_dry = self.arrived == 0 and not self.in_flight
        return ran_dry or self.batch.age_seconds() >= self.batch_seconds

    def _finish(self) -> None:
        """Stopping: take no more, store what we hold, acknowledge what got committed."""
        # Deliveries not yet dispatched to us are handed back to the broker by the cancel;
        # those the reader has already read are ours to store.
        if self.reader is not None:
            self.reader.stop()
        assert self.channel is not None  # still connected: a lost connection skips this
        self.channel.basic_cancel(self.consumer_tag)
        self._take_from_reader()
        if self.batch is not None:
            self._hand_over()
        while self.in_flight:
            self._process_events(IDLE_WAKE_SECONDS)

    # -- one delivery -----------------------------------------------------------------------

    def _on_message(self, _channel: BlockingChannel, method, properties, body: bytes) -> None:
        """pika's path, where the delivery reader could not attach."""
        self._take(method.delivery_tag, properties, body)

    def _take(self, tag: int, properties: pika.BasicProperties | bytes, body: bytes) -> None:
        self.arrived += 1
        if self.batch is None:
            self.batch = Batch(self.amqp_connection)
        batch = self.batch
        batch.deliveries.append(self._validate(Delivery(tag, properties, body)))
        batch.body_bytes += len(body)
        if len(batch.deliveries) >= self.batch_size or batch.body_bytes >= MAX_BATCH_BYTES:
            self._hand_over()

    def _validate(self, delivery: Delivery) -> Delivery:
        body = delivery.body
        try:
            notification = parse_notification(body, self.settings.smsq_default_region)
        except InvalidMessage as exc:
            delivery.error = str(exc)
            return delivery
        except Exception:  # noqa: BLE001 - one poisonous message must not stop ingest
            log.exception("validation failed unexpectedly", extra={"action": "validation_bug"})
            delivery.error = "message: smsq could not validate it (a bug; see its log)"
            return delivery
        refusal = country_refusal(notification, self.allowed_countries)
        if refusal is not None:
            metrics.MESSAGES_REFUSED_COUNTRY.labels(
                country_of(notification.sms.to_phone_number)).inc()
            delivery.error = refusal
            return delivery
        notification_id = notification.id or _id_from_properties(delivery)
        if notification_id is not None:
            sender = sender_for(notification.sms.to_phone_number, self.senders)
            delivery.row = storage.IngestRow(notification, notification_id, sender)
        return delivery

    # -- hand over, then acknowledge what the writers stored --------------------------------

    def _hand_over(self) -> None:
        batch, self.batch = self.batch, None
        assert batch is not None  # called with a batch gathered
        self.in_flight.append(batch)
        self.writer.submit(batch)

    def _wake_for(self, batch: Batch) -> None:
        """Writer thread: ask the batch's pika thread to acknowledge what is done."""
        try:
            batch.connection.add_callback_threadsafe(self._acknowledge_done)
        except pika.exceptions.ConnectionWrongStateError:
            pass  # that connection is gone: the broker redelivers the batch, a no-op to store
        self.batch_done.set()

    def _acknowledge_done(self) -> None:
        while self.in_flight and self.in_flight[0].outcome is not Outcome.WAITING:
            batch = self.in_flight.popleft()
            if batch.outcome is Outcome.FAILED:
                assert batch.failure is not None  # the writer sets it with FAILED
                raise batch.failure
            if batch.outcome is Outcome.ABANDONED:
                # Writers run side by side: a batch after this one may have been stored,
                # and its basic_ack(multiple=True) would acknowledge this one's messages too.
                self.acks_withheld = True
            if batch.outcome is Outcome.STORED and not self.acks_withheld:
                for delivery in batch.deliveries:
                    if delivery.error is not None:
                        self._publish_dead(delivery)
                assert self.channel is not None  # a batch in flight is of this connection
                self.channel.basic_ack(batch.deliveries[-1].tag, multiple=True)

    def _publish_dead(self, delivery: Delivery) -> None:
        original, reason = delivery.properties, delivery.error
        assert reason is not None  # only a delivery refused is dead-lettered
        if delivery.properties_error is not None and "AMQP properties" not in reason:
            reason += f"; message: its AMQP properties could not be decoded " \
                      f"({delivery.properties_error})"
        properties = dead_letters.properties_for(original, reason)
        # Confirmed publish: returns only once the broker has the dead letter.
        assert self.dead_channel is not None  # opened with the channel it acknowledges on
        self.dead_channel.basic_publish("", self.settings.dead_queue, delivery.body,
                                        properties, mandatory=True)
        metrics.MESSAGES_DEAD_LETTERED.labels(_field_at_fault(reason)).inc()
        log.warning("message dead-lettered", extra={
            "action": "message_dead_lettered",
            "key": dead_letters.key_of(original, delivery.body),  # as `smsq dead` names it
            "reason": reason})

    # -- the AMQP connection ----------------------------------------------------------------

    def _open_amqp(self) -> bool:
        # Delivery tags never outlive their channel: what was held before is redelivered.
        self.batch = None
        self.acks_withheld = False
        self.orphaned = [*self._orphans_waiting(), *self.in_flight]
        self.in_flight.clear()
        try:
            self.amqp_connection = amqp.connect(self.settings, "consume", self.next_broker)
        except pika.exceptions.ProbableAuthenticationError as exc:
            raise FatalBrokerError(f"AMQP_URL: RabbitMQ refused the credentials ({exc})") from None
        except pika.exceptions.ProbableAccessDeniedError as exc:
            raise FatalBrokerError(f"AMQP_URL: RabbitMQ refused the virtual host ({exc})") from None
        try:
            self.channel = self.amqp_connection.channel()
            amqp.declare_topology(self.channel, self.settings)
            self.channel.basic_qos(prefetch_count=self.settings.smsq_prefetch)
            self.dead_channel = self.amqp_connection.channel()
            self.dead_channel.confirm_delivery()
            # The tag is chosen here: the reader must know it before the first delivery.
            tag = f"smsq-consume-{uuid4().hex}"
            self.reader = DeliveryReader.attach(self.amqp_connection, self.channel, tag)
            self.consumer_tag = self.channel.basic_consume(self.settings.smsq_queue,
                                                           self._on_message, consumer_tag=tag)
            self.channel.add_on_cancel_callback(self._on_cancelled_by_broker)
        except BaseException:
            self._close_amqp()
            raise
        metrics.DEPENDENCY_UP.labels("rabbitmq").set(1)
        self.next_broker = amqp.broker_index(self.settings, self.amqp_connection) + 1
        return True

    def _on_cancelled_by_broker(self, _method_frame) -> None:
        raise ConsumerCancelled(
            f"the broker cancelled the consumer of {self.settings.smsq_queue} "
            "(was the queue deleted?)")

    def _close_amqp(self) -> None:
        metrics.DEPENDENCY_UP.labels("rabbitmq").set(0)
        if self.amqp_connection is not None and self.amqp_connection.is_open:
            try:
                self.amqp_connection.close()
            except pika.exceptions.AMQPError:
                pass
        self.amqp_connection = self.channel = self.dead_channel = self.reader = None


def _id_from_properties(delivery: Delivery) -> UUID | None:
    """The id of a message whose body carries none: from its message_id property, else
    from its body; None (and the delivery's error set) when its properties, where a
    message_id would be, cannot be decoded."""
    message_id = delivery.properties.message_id
    if delivery.properties_error is None:
        return derive_id(message_id, delivery.body)
    delivery.error = ("message: carries no id, and its AMQP properties could not be decoded "
                      f"to look for a message_id ({delivery.properties_error})")
    return None


def _message_fields() -> frozenset[str]:
    """Every field a reason may name: the only values of the dead-letter metric's label."""
    def paths(model: type[BaseModel], prefix: str) -> list[str]:
        found = []
        for name, info in model.model_fields.items():
            found.append(prefix + name)
            inner = info.annotation
            for candidate in (inner, *getattr(inner, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    found += paths(candidate, f"{prefix}{name}.")
        return found
    return frozenset(["message", *paths(Notification, "")])


_MESSAGE_FIELDS = _message_fields()


def _field_at_fault(reason: str) -> str:
    """The field a reason names first, as a metric label: an unknown key a producer made up
    (or a list index) must not add a time series of its own."""
    field = ".".join(part for part in reason.split(":", 1)[0].split(".") if not part.isdigit())
    return field if field in _MESSAGE_FIELDS else "unknown field"


def run(settings: Settings, stop: StopSignal) -> None:
    metrics.serve_metrics(settings.smsq_metrics_port, settings.smsq_metrics_host,
                          metrics.program_registry(metrics.INGEST_METRICS, settings.database_dsn))
    _collect_garbage_less_often()
    # Checking a number seen for the first time runs dozens of phonenumbers' metadata
    # patterns; kept compiled, not looked up in the re module's cache (where they push each
    # other out), the check takes a quarter less time, and most one-time-code recipients are
    # seen for the first time.
    phonenumbers.enable_pattern_cache()
    Ingester(settings, stop).run()


def _collect_garbage_less_often() -> None:
    """Each message allocates dozens of objects that live until its batch is acknowledged.

    At the default threshold (700 allocations) the cyclic collector runs every few dozen
    messages and walks them, and the modules' objects, again and again: a sixth of the
    consumer's CPU in bench/ingest.py. Objects alive by now are frozen out of its walks, and
    it runs a thirtieth as often; reference cycles are rare here, so memory barely grows.
    """
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
