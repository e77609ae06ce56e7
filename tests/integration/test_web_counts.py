"""The dashboard's counts by status and priority (appended deltas) always equal a real count."""

from __future__ import annotations

import uuid

import psycopg

from consumer import pipeline
from consumer.ingest import storage
from consumer.migrate import available_migrations, migrate
from consumer.ops import actions
from schemas.message import Notification


def ingest(conn: psycopg.Connection, count: int, priority: str) -> list[uuid.UUID]:
    """Store through ingest's own statements, twice: COPY, then the staged path of a redelivery."""
    rows = [storage.IngestRow.of(Notification.model_validate({
        "body": "hello", "priority": priority, "sms": {"to_phone_number": "+14155550123"},
    }).with_defaults(uuid.uuid4())) for _ in range(count)]
    storage.prepare_ingest(conn)
    for _ in range(2):
        storage.insert_batch(conn, rows)
        conn.commit()
    return [row.notification.id for row in rows]


def real_counts(conn: psycopg.Connection) -> list[tuple[str, str, int]]:
    return conn.execute("SELECT status, priority, count(*) FROM notification "
                        "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()


def assert_counts_exact(conn: psycopg.Connection) -> None:
    assert pipeline.counts_by_status(conn) == real_counts(conn)


def test_counts_follow_inserts_updates_retries_cancels_and_deletes(settings):
    with psycopg.connect(settings.database_dsn) as conn:
        high = ingest(conn, 30, "high")
        low = ingest(conn, 20, "low")
        assert_counts_exact(conn)
        # a claim and its outcomes, each one statement over many rows
        conn.execute("UPDATE notification SET status = 'processing' WHERE id = ANY(%s)", (high,))
        conn.execute("UPDATE notification SET status = 'sent' WHERE id = ANY(%s)", (high[:20],))
        conn.execute("UPDATE notification SET status = 'errored' WHERE id = ANY(%s)", (high[20:],))
        conn.execute("UPDATE notification SET claimed_by = 'x'")  # no status change at all
        conn.commit()
        assert_counts_exact(conn)
        assert actions.retry(conn, ids=high[20:25])
        assert actions.cancel(conn, low[:5])
        conn.execute("DELETE FROM notification WHERE id = ANY(%s)", (low[5:10],))
        conn.commit()
        assert_counts_exact(conn)
        assert pipeline.fold_counts(conn) > 6
        conn.commit()
        assert_counts_exact(conn)
        rows = conn.execute("SELECT count(*) FROM notification_count_delta").fetchone()[0]
        assert rows == len(real_counts(conn))  # one row per pair after folding
        conn.execute("TRUNCATE notification CASCADE")
        conn.commit()
        assert pipeline.counts_by_status(conn) == []


def test_migration_0004_counts_the_rows_already_there(database_url):
    """A database that lived before 0004: its existing notifications are counted once."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
        conn.execute("CREATE TABLE smsq_migration (version integer PRIMARY KEY, name text NOT NULL, "
                     "applied_datetime timestamptz NOT NULL DEFAULT now())")
        for migration in available_migrations():
            if migration.version < 4:
                conn.execute(migration.sql)
                conn.execute("INSERT INTO smsq_migration (version, name) VALUES (%s, %s)",
                             (migration.version, migration.name))
    with psycopg.connect(database_url) as conn:
        ingest(conn, 7, "high")
        ingest(conn, 3, "low")
    assert [m.version for m in migrate(database_url)][0] == 4
    with psycopg.connect(database_url) as conn:
        assert pipeline.counts_by_status(conn) == [("pending", "high", 7), ("pending", "low", 3)]
        assert_counts_exact(conn)


def test_one_statement_over_many_rows_writes_one_event_per_changed_row(settings):
    """The history comes from statement triggers (0010): every row a statement changes has
    its event, with the old and new value and the message or error code; rows it leaves as
    they were have none."""
    with psycopg.connect(settings.database_dsn) as conn:
        ids = ingest(conn, 4, "high")
        conn.execute("UPDATE notification SET status = 'processing' WHERE id = ANY(%s)", (ids,))
        conn.execute("UPDATE notification SET status = CASE WHEN id = %s THEN 'errored' "
                     "ELSE 'sent' END, status_message = 'done' WHERE id = ANY(%s)",
                     (ids[0], ids[:3]))
        conn.execute("UPDATE sms_notification SET delivery_status = 'failed', error_code = 30005"
                     " WHERE notification_id = ANY(%s)", (ids[1:3],))
        conn.execute("UPDATE sms_notification SET delivery_status = 'failed'"
                     " WHERE notification_id = ANY(%s)", (ids,))  # two of them unchanged
        conn.commit()
        events = conn.execute(
            "SELECT notification_id, field, old_value, new_value, message, error_code"
            " FROM notification_event ORDER BY id").fetchall()
    of = {i: [e[1:] for e in events if e[0] == i] for i in ids}
    assert of[ids[0]] == [("status", "pending", "processing", "", None),
                          ("status", "processing", "errored", "done", None),
                          ("delivery_status", None, "failed", "", None)]
    assert of[ids[1]] == of[ids[2]] == [
        ("status", "pending", "processing", "", None),
        ("status", "processing", "sent", "done", None),
        ("delivery_status", None, "failed", "", 30005)]
    assert of[ids[3]] == [("status", "pending", "processing", "", None),
                          ("delivery_status", None, "failed", "", None)]
