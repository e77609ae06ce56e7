"""Prometheus metrics of every smsq program, and the endpoint that serves them.

Each program exports its own metrics (and the process's, the dependencies', the backlog),
not the other programs' as zeros: an alert on `smsq_dispatch_senders_held == 0` must not
fire on consume. So the metrics are created unregistered, and each program gathers its
group into a registry of its own (`program_registry`).
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import psycopg
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg_pool import PoolTimeout
from pydantic import BaseModel

from consumer import money, pipeline
from consumer.settings import ConfigError
from schemas.message import Notification

log = logging.getLogger(__name__)

MESSAGES_INGESTED = Counter(
    "smsq_messages_ingested_total", "Messages stored in Postgres by smsq consume",
    registry=None,
)
MESSAGES_DUPLICATE = Counter(
    "smsq_messages_duplicate_total", "Messages acknowledged whose id was already stored",
    registry=None,
)
def _field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field of the message format as an error names it: `sms.to_phone_number`."""
    paths = set()
    for name, field in model.model_fields.items():
        paths.add(prefix + name)
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                paths |= _field_paths(kind, f"{prefix}{name}.")
    return paths


# A label value comes from the message format, never from the message: an unknown field
# named with 20,000 characters must not become a series of that name (nor one per name).
DEAD_LETTER_FIELDS = frozenset({"message", *_field_paths(Notification)})
UNKNOWN_FIELD = "unknown_field"


def field_label(field: str) -> str:
    """The label of the field at fault: `sms.media_url.2` is `sms.media_url`; a field the
    format does not have is `unknown_field`."""
    known = ".".join(part for part in field.split(".") if not part.isdigit())
    return known if known in DEAD_LETTER_FIELDS else UNKNOWN_FIELD


class FieldCounter(Counter):
    """A counter labelled by a message field, whatever text its callers pass as the field."""

    def labels(self, field: str) -> Counter:  # type: ignore[override]
        return super().labels(field_label(field))


MESSAGES_DEAD_LETTERED = FieldCounter(
    "smsq_messages_dead_lettered_total",
    "Messages sent to the dead-letter queue, by the first field at fault",
    ["field"],
    registry=None,
)
INGEST_BATCH_SECONDS = Histogram(
    "smsq_ingest_batch_seconds", "Time the writer takes to store and commit one ingest batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=None,
)
INGEST_BATCH_SIZE = Histogram(
    "smsq_ingest_batch_size", "Messages per ingest batch",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
    registry=None,
)
DEPENDENCY_UP = Gauge(
    "smsq_dependency_up", "1 when the program is connected to the dependency", ["dependency"],
    registry=None,
)

DISPATCH_SENDS = Counter(
    "smsq_dispatch_sends_total",
    "Messages handed to Twilio, by the status they ended in and Twilio's error code",
    ["outcome", "error_code"],
    registry=None,
)
DISPATCH_RECONCILED = Counter(
    "smsq_dispatch_reconciled_total",
    "Rows of unknown outcome checked with Twilio: found (sent) or not (pending again)",
    ["result"],
    registry=None,
)
TWILIO_REQUEST_SECONDS = Histogram(
    "smsq_twilio_request_seconds", "Time of one Messages create request to Twilio",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=None,
)
BUCKET_TOKENS = Gauge(
    "smsq_bucket_tokens", "Tokens (segments) in each paced sender's bucket", ["sender"],
    registry=None,
)
SENDERS_HELD = Gauge(
    "smsq_dispatch_senders_held", "Senders this dispatcher paces (holds the lock of)",
    registry=None,
)
SENDER_PAUSED = Gauge(
    "smsq_sender_paused",
    "1 while a sender is paused by an account-wide Twilio error (20003, 20404, 21611, 63038) "
    "or by its daily budget (reason daily_budget)",
    ["sender", "reason"],
    registry=None,
)
# The guard rails (README "Guard rails").
DISPATCH_SUPPRESSED = Counter(
    "smsq_dispatch_suppressed_total",
    "Notifications errored without a request because their number is suppressed",
    registry=None,
)
DISPATCH_CAPPED = Counter(
    "smsq_dispatch_capped_total",
    "Notifications errored without a request because they would pass SMSQ_RECIPIENT_LIMIT",
    ["limit"],
    registry=None,
)
BUDGET_PAUSES = Counter(
    "smsq_dispatch_budget_pauses_total",
    "Times a sender paused until the next UTC day: SMSQ_DAILY_SEGMENT_LIMIT reached",
    ["sender"],
    registry=None,
)
MESSAGES_REFUSED_COUNTRY = Counter(
    "smsq_messages_refused_country_total",
    "Messages dead-lettered because their number's country is not in SMSQ_ALLOWED_COUNTRIES",
    ["country"],
    registry=None,
)
INBOUND_MESSAGES = Counter(
    "smsq_inbound_messages_total",
    "Incoming messages (POST /twilio/inbound) by what became of them: opt_out, opt_in, "
    "ignored, forbidden",
    ["outcome"],
    registry=None,
)


def serve_metrics(port: int, host: str, registry: CollectorRegistry) -> None:
    """Expose /metrics on `host`:`port` in a background thread; port 0 means no endpoint."""
    if not port:
        return
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # taken by another program: a setting to change, not a crash
        raise ConfigError(f"SMSQ_METRICS_PORT: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None


STATUS_CALLBACKS = Counter(
    "smsq_status_callbacks_total",
    "Twilio status callbacks received by smsq serve, by what became of them",
    ["outcome"],  # applied, stale, unknown_sid, ignored, forbidden,
    registry=None,
)
MEDIA_REQUESTS = Counter(
    "smsq_media_requests_total", "Requests for hosted MMS media, by result", ["result"],
    registry=None,
)
MEDIA_DELETED = Counter(
    "smsq_media_deleted_total", "Expired hosted media deleted by smsq serve's cleanup",
    registry=None,
)
DELIVERY_ALERT = Gauge(
    "smsq_delivery_alert",
    "1 while a delivery-health alert is in force (reason: failure_rate, slow_receipts, "
    "carrier_filtering), per sender or destination country",
    ["scope", "key", "reason"],
    registry=None,
)
DELIVERY_FAILURE_RATIO = Gauge(
    "smsq_delivery_failure_ratio",
    "Share of the last hour's finished messages that were not delivered, per sender",
    ["sender"],
    registry=None,
)
SLOW_RECEIPT_RATIO = Gauge(
    "smsq_slow_receipt_ratio",
    "Share of the last hour's sent messages without a final receipt after "
    "SMSQ_SLOW_RECEIPT_MINUTES, per sender",
    ["sender"],
    registry=None,
)


Connect = Callable[[], AbstractContextManager[psycopg.Connection]]


def connect_to(database_dsn: str) -> Connect:
    """A new connection per scrape: for consume and dispatch, scraped by Prometheus alone."""
    return lambda: psycopg.connect(database_dsn, connect_timeout=2)


class BacklogCollector(Collector):
    """Backlog by status and priority, the oldest due message's age, and the spend so far
    (smsq_spend_total), read at scrape time.

    Read from Postgres on each scrape (two indexed queries) rather than kept in gauges, so
    every program shows the same truth whoever changed the rows. When Postgres does not
    answer, the scrape still succeeds without these metrics (smsq_dependency_up says why).
    `connect` gives the connection: `smsq serve`, which answers anyone, lends one of its pool.
    """

    def __init__(self, connect: Connect) -> None:
        self.connect = connect

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            with self.connect() as conn:
                conn.execute("SET statement_timeout = 2000")
                backlog = pipeline.backlog_counts(conn)
                oldest = pipeline.oldest_due_age_seconds(conn)
                spend = money.spend_by_sender(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("backlog not readable", extra={"action": "metrics_backlog_failed",
                                                       "error": str(exc).splitlines()[0]})
            return
        yield backlog_family(backlog)
        yield spend_family(spend)
        yield GaugeMetricFamily(
            "smsq_oldest_due_age_seconds",
            "Age of the oldest pending message that is due (0 when none waits)", value=oldest or 0)


def spend_family(rows: list[dict]) -> CounterMetricFamily:
    """What Twilio charged, all told, as the price sweep recorded it (never lowered by prune)."""
    family = CounterMetricFamily("smsq_spend", "Twilio's price of the messages sent, by sender "
                                 "and currency", labels=["sender", "currency"])
    for row in rows:
        family.add_metric([row["sender"] or "default", row["currency"]], row["total"])
    return family


def backlog_family(rows: list[tuple[str, str, int]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily("smsq_backlog", "Messages not done yet, by status and priority",
                               labels=["status", "priority"])
    found = {(status, priority): count for status, priority, count in rows}
    for status in pipeline.NOT_DONE:
        for priority in pipeline.PRIORITIES:
            family.add_metric([status, priority], found.get((status, priority), 0))
    return family


INGEST_METRICS = (MESSAGES_INGESTED, MESSAGES_DUPLICATE, MESSAGES_DEAD_LETTERED,
                  INGEST_BATCH_SECONDS, INGEST_BATCH_SIZE, MESSAGES_REFUSED_COUNTRY)
DISPATCH_METRICS = (DISPATCH_SENDS, DISPATCH_RECONCILED, TWILIO_REQUEST_SECONDS, BUCKET_TOKENS,
                    SENDERS_HELD, SENDER_PAUSED, DISPATCH_SUPPRESSED, DISPATCH_CAPPED,
                    BUDGET_PAUSES)
SERVE_METRICS = (STATUS_CALLBACKS, MEDIA_REQUESTS, MEDIA_DELETED, INBOUND_MESSAGES,
                 DELIVERY_ALERT, DELIVERY_FAILURE_RATIO, SLOW_RECEIPT_RATIO)


def program_registry(program_metrics: tuple[Collector, ...], database_dsn: str,
                     connect: Connect | None = None) -> CollectorRegistry:
    """What one program exports: its own metrics, the process's, the dependencies', the backlog."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, DEPENDENCY_UP,
                      *program_metrics):
        registry.register(collector)
    watch_backlog(database_dsn, registry, connect)
    return registry


def watch_backlog(database_dsn: str, registry: CollectorRegistry,
                  connect: Connect | None = None) -> None:
    """Add the backlog to a registry: read from Postgres at each scrape."""
    registry.register(BacklogCollector(connect or connect_to(database_dsn)))
