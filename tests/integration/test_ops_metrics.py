"""The metrics endpoint, and its backlog collector: read from Postgres at scrape time, cheap,
and harmless when Postgres is down."""

from __future__ import annotations

import urllib.request
from datetime import timedelta

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from consumer import pipeline
from consumer.metrics import INGEST_METRICS, program_registry, serve_metrics, watch_backlog
from tests.integration.test_ops_cli import insert
from tests.support import free_port

NO_POSTGRES = "postgresql://postgres@127.0.0.1:1/none"


def scrape(database_dsn: str) -> dict[str, float]:
    registry = CollectorRegistry()
    watch_backlog(database_dsn, registry)
    samples = {}
    for family in registry.collect():
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_backlog_by_status_and_priority_and_oldest_due_age(settings):
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        insert(conn, "pending", "high", age=timedelta(minutes=10))
        insert(conn, "pending", "high")
        insert(conn, "processing", "low")
        insert(conn, "sent", "low")
        conn.execute("UPDATE notification SET publish_datetime = now() + interval '1 hour' "
                     "WHERE id = %s", (insert(conn, "pending", "medium"),))  # scheduled

    samples = scrape(settings.database_dsn)

    assert samples["smsq_backlog{priority=high,status=pending}"] == 2
    assert samples["smsq_backlog{priority=medium,status=pending}"] == 1
    assert samples["smsq_backlog{priority=low,status=processing}"] == 1
    assert samples["smsq_backlog{priority=low,status=pending}"] == 0
    assert not any("sent" in name for name in samples)
    assert 600 <= samples["smsq_oldest_due_age_seconds"] < 3600


def test_the_backlog_is_read_from_the_counts_not_by_reading_notifications(settings):
    """Each scrape must stay cheap with millions of rows: it reads no notification row."""
    # Scans of the table itself (sequential) and of each of its indexes.
    scans = """SELECT pg_stat_get_xact_numscans('notification'::regclass)
                      + (SELECT sum(pg_stat_get_xact_numscans(indexrelid)) FROM pg_index
                         WHERE indrelid = 'notification'::regclass)"""
    with psycopg.connect(settings.database_dsn) as conn:
        before = conn.execute(scans).fetchone()[0]
        pipeline.backlog_counts(conn)
        assert conn.execute(scans).fetchone()[0] == before
        conn.execute("SELECT 1 FROM notification WHERE id = gen_random_uuid()")
        assert conn.execute(scans).fetchone()[0] == before + 1  # an index lookup is counted


def test_a_scrape_without_postgres_still_answers():
    registry = CollectorRegistry()
    watch_backlog(NO_POSTGRES, registry)
    assert b"smsq_backlog" not in generate_latest(registry)


def test_the_endpoint_listens_on_the_configured_address():
    port = free_port()
    serve_metrics(port, "127.0.0.2", program_registry(INGEST_METRICS, NO_POSTGRES))
    assert b"smsq_" in urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
