"""Prometheus metrics of every smsq program, and the endpoint that serves them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

MESSAGES_INGESTED = Counter(
    "smsq_messages_ingested_total", "Messages stored in Postgres by smsq consume"
)
MESSAGES_DUPLICATE = Counter(
    "smsq_messages_duplicate_total", "Messages acknowledged whose id was already stored"
)
MESSAGES_DEAD_LETTERED = Counter(
    "smsq_messages_dead_lettered_total",
    "Messages sent to the dead-letter queue, by the first field at fault",
    ["field"],
)
INGEST_BATCH_SECONDS = Histogram(
    "smsq_ingest_batch_seconds", "Time to store and acknowledge one ingest batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INGEST_BATCH_SIZE = Histogram(
    "smsq_ingest_batch_size", "Messages per ingest batch",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
DEPENDENCY_UP = Gauge(
    "smsq_dependency_up", "1 when the program is connected to the dependency", ["dependency"]
)

DISPATCH_SENDS = Counter(
    "smsq_dispatch_sends_total",
    "Messages handed to Twilio, by the status they ended in and Twilio's error code",
    ["outcome", "error_code"],
)
DISPATCH_RECONCILED = Counter(
    "smsq_dispatch_reconciled_total",
    "Rows of unknown outcome checked with Twilio: found (sent) or not (pending again)",
    ["result"],
)
TWILIO_REQUEST_SECONDS = Histogram(
    "smsq_twilio_request_seconds", "Time of one Messages create request to Twilio",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BUCKET_TOKENS = Gauge(
    "smsq_bucket_tokens", "Tokens (segments) in each paced sender's bucket", ["sender"]
)
SENDERS_HELD = Gauge(
    "smsq_dispatch_senders_held", "Senders this dispatcher paces (holds the lock of)"
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on `port` in a background thread; 0 means no endpoint."""
    if port:
        start_http_server(port, addr=host)

STATUS_CALLBACKS = Counter(
    "smsq_status_callbacks_total",
    "Twilio status callbacks received by smsq serve, by what became of them",
    ["outcome"],  # applied, stale, unknown_sid, ignored, forbidden
)
MEDIA_REQUESTS = Counter(
    "smsq_media_requests_total", "Requests for hosted MMS media, by result", ["result"]
)
MEDIA_DELETED = Counter(
    "smsq_media_deleted_total", "Expired hosted media deleted by smsq serve's cleanup"
)
