"""`smsq consume`: RabbitMQ -> validate -> Postgres, in batches, acknowledged after commit.

The loop owns one AMQP connection and one database connection, both used from this thread
only. Deliveries are validated as they arrive and buffered; the buffer is flushed when it
holds `SMSQ_INGEST_BATCH_SIZE` messages, when it is `SMSQ_INGEST_BATCH_MS` old, or at once
when the queue runs dry. A flush stores the valid ones in one transaction, dead-letters the
invalid ones (confirmed by the broker), and only then acknowledges the whole buffer with one
`basic_ack(multiple=True)`. Nothing is acknowledged that is not committed or dead-lettered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pika
import pika.exceptions
import psycopg
import tenacity
from pika.adapters.blocking_connection import BlockingChannel

from consumer import amqp, metrics, store
from consumer.senders import sender_for
from consumer.settings import Settings
from consumer.signals import StopSignal
from schemas.errors import InvalidMessage, parse_notification
from schemas.message import derive_id

log = logging.getLogger(__name__)

MAX_ERROR_HEADER = 1000  # characters of x-error; the reason comes first, so little is lost


class FatalBrokerError(Exception):
    """The broker refused us for a reason a reconnect will not fix (credentials, arguments)."""


@dataclass
class Delivery:
    tag: int
    body: bytes
    properties: pika.BasicProperties
    row: store.IngestRow | None = None
    error: str | None = None


@dataclass
class Batch:
    deliveries: list[Delivery] = field(default_factory=list)
    started: float = 0.0

    def add(self, delivery: Delivery) -> None:
        if not self.deliveries:
            self.started = time.monotonic()
        self.deliveries.append(delivery)

    def __len__(self) -> int:
        return len(self.deliveries)

    def age_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000


class Ingester:
    def __init__(self, settings: Settings, stop: StopSignal) -> None:
        self.settings = settings
        self.stop = stop
        self.senders = settings.extra_senders
        self.batch = Batch()
        self.arrived = 0  # deliveries since the loop last looked; 0 means the queue ran dry
        self.flushing = False
        self.amqp_connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.dead_channel: BlockingChannel | None = None
        self.db: psycopg.Connection | None = None
        self.consumer_tag = ""

    # -- the outer loop: connect, consume, reconnect -----------------------------------------

    def run(self) -> None:
        for attempt in _forever_with_backoff(self.stop, "rabbitmq"):
            with attempt:
                try:
                    self._consume()
                finally:
                    self._close_amqp()
        self._close_db()
        log.info("consumer stopped", extra={"action": "consume_stopped"})

    def _consume(self) -> None:
        self._open_amqp()
        self._ensure_db()
        log.info("consuming", extra={"action": "consume_started",
                                     "queue": self.settings.smsq_queue})
        while not self.stop.requested:
            self.arrived = 0
            # Block (up to 1 s, to notice a stop) only when nothing waits to be flushed.
            self.amqp_connection.process_data_events(time_limit=0 if len(self.batch) else 1)
            if len(self.batch) and (self.arrived == 0 or self._batch_is_due()):
                self._flush()
        self._flush()
        self.channel.basic_cancel(self.consumer_tag)

    def _batch_is_due(self) -> bool:
        return (len(self.batch) >= self.settings.smsq_ingest_batch_size
                or self.batch.age_ms() >= self.settings.smsq_ingest_batch_ms)

    # -- one delivery -----------------------------------------------------------------------

    def _on_message(self, _channel: BlockingChannel, method, properties, body: bytes) -> None:
        self.arrived += 1
        self.batch.add(self._validate(method.delivery_tag, properties, body))
        if not self.flushing and len(self.batch) >= self.settings.smsq_ingest_batch_size:
            self._flush()

    def _validate(self, tag: int, properties: pika.BasicProperties, body: bytes) -> Delivery:
        delivery = Delivery(tag, body, properties)
        try:
            notification = parse_notification(body, self.settings.smsq_default_region)
        except InvalidMessage as exc:
            delivery.error = str(exc)
            return delivery
        fallback_id = derive_id(properties.message_id, body) if notification.id is None else None
        notification = notification.with_defaults(fallback_id, now=datetime.now(timezone.utc))
        sender = sender_for(notification.sms.to_phone_number, self.senders)
        delivery.row = store.IngestRow(notification, sender)
        return delivery

    # -- flush: store, dead-letter, then acknowledge ----------------------------------------

    def _flush(self) -> None:
        if not len(self.batch) or self.channel is None:
            return
        # Take the batch: deliveries that arrive while we wait on Postgres or on the broker's
        # confirms start the next one, so the ack below covers only what this flush stored.
        batch, self.batch = self.batch, Batch()
        self.flushing = True
        try:
            started = time.perf_counter()
            self._store_valid(batch)
            for delivery in batch.deliveries:
                if delivery.error is not None:
                    self._publish_dead(delivery)
            self.channel.basic_ack(batch.deliveries[-1].tag, multiple=True)
            metrics.INGEST_BATCH_SECONDS.observe(time.perf_counter() - started)
            metrics.INGEST_BATCH_SIZE.observe(len(batch))
        finally:
            self.flushing = False

    def _store_valid(self, batch: Batch) -> None:
        """Commit the batch's valid rows, retrying through a database outage.

        While Postgres is away the AMQP connection keeps its heartbeats (we sleep through
        pika) and nothing is acknowledged; the prefetch bounds what waits meanwhile.
        """
        rows = [d.row for d in batch.deliveries if d.row is not None]
        if not rows:
            return
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(psycopg.OperationalError),
            wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=10),
            stop=lambda _state: self.stop.requested,
            sleep=self._sleep_keeping_amqp_alive,
            before_sleep=_log_retry("postgres"),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                self._ensure_db()
                self._insert_and_commit(rows)

    def _insert_and_commit(self, rows: list[store.IngestRow]) -> None:
        try:
            inserted = store.insert_batch(self.db, rows)
            self.db.commit()
        except psycopg.OperationalError:
            self._close_db()
            metrics.DEPENDENCY_UP.labels("postgres").set(0)
            raise
        metrics.MESSAGES_INGESTED.inc(inserted)
        metrics.MESSAGES_DUPLICATE.inc(len(rows) - inserted)
        log.debug("batch stored", extra={"action": "batch_stored", "stored": inserted,
                                         "duplicates": len(rows) - inserted})

    def _publish_dead(self, delivery: Delivery) -> None:
        original = delivery.properties
        headers = dict(original.headers or {})
        headers["x-error"] = delivery.error[:MAX_ERROR_HEADER]
        headers["x-dead-lettered-at"] = datetime.now(timezone.utc).isoformat()
        properties = pika.BasicProperties(
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            message_id=original.message_id,
            correlation_id=original.correlation_id,
            timestamp=original.timestamp,
            app_id=original.app_id,
            headers=headers,
            delivery_mode=pika.DeliveryMode.Persistent,
        )
        # Confirmed publish: returns only once the broker has the dead letter.
        self.dead_channel.basic_publish("", self.settings.dead_queue, delivery.body,
                                        properties, mandatory=True)
        field_at_fault = delivery.error.split(":", 1)[0]
        metrics.MESSAGES_DEAD_LETTERED.labels(field_at_fault).inc()
        log.warning("message dead-lettered", extra={
            "action": "message_dead_lettered", "message_id": original.message_id,
            "reason": delivery.error})

    # -- connections ------------------------------------------------------------------------

    def _open_amqp(self) -> None:
        self.batch = Batch()  # delivery tags never outlive their channel
        try:
            self.amqp_connection = amqp.connect(self.settings, "consume")
        except pika.exceptions.ProbableAuthenticationError as exc:
            raise FatalBrokerError(f"AMQP_URL: RabbitMQ refused the credentials ({exc})") from None
        except pika.exceptions.ProbableAccessDeniedError as exc:
            raise FatalBrokerError(f"AMQP_URL: RabbitMQ refused the virtual host ({exc})") from None
        self.channel = self.amqp_connection.channel()
        amqp.declare_topology(self.channel, self.settings)
        self.channel.basic_qos(prefetch_count=self.settings.smsq_prefetch)
        self.dead_channel = self.amqp_connection.channel()
        self.dead_channel.confirm_delivery()
        self.consumer_tag = self.channel.basic_consume(self.settings.smsq_queue, self._on_message)
        metrics.DEPENDENCY_UP.labels("rabbitmq").set(1)

    def _close_amqp(self) -> None:
        metrics.DEPENDENCY_UP.labels("rabbitmq").set(0)
        if self.amqp_connection is not None and self.amqp_connection.is_open:
            try:
                self.amqp_connection.close()
            except pika.exceptions.AMQPError:
                pass
        self.amqp_connection = self.channel = self.dead_channel = None

    def _ensure_db(self) -> None:
        if self.db is None or self.db.closed:
            self.db = psycopg.connect(self.settings.database_dsn, autocommit=False,
                                      application_name="smsq consume")
            store.prepare_ingest(self.db)
            metrics.DEPENDENCY_UP.labels("postgres").set(1)

    def _close_db(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except psycopg.Error:
                pass
            self.db = None

    def _sleep_keeping_amqp_alive(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop.requested and (left := deadline - time.monotonic()) > 0:
            self.amqp_connection.sleep(min(left, 0.5))


def _forever_with_backoff(stop: StopSignal, dependency: str) -> tenacity.Retrying:
    """Reconnect to RabbitMQ on connection loss, with a growing backoff, until stopped."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(
            (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError,
             pika.exceptions.StreamLostError, psycopg.OperationalError, ConnectionError)
        ),
        wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=30),
        stop=lambda _state: stop.requested,
        sleep=stop.wait,
        before_sleep=_log_retry(dependency),
        reraise=False,
        retry_error_callback=lambda _state: None,
    )


def _log_retry(dependency: str):
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(f"{dependency} unavailable, retrying",
                    extra={"action": f"{dependency}_retry", "attempt": state.attempt_number,
                           "wait_seconds": round(state.upcoming_sleep, 2),
                           "error": f"{type(exc).__name__}: {exc}"})
    return before_sleep


def run(settings: Settings, stop: StopSignal) -> None:
    metrics.serve_metrics(settings.smsq_metrics_port)
    Ingester(settings, stop).run()
