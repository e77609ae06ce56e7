"""Operator actions on stored notifications and on the dead-letter queue."""

from __future__ import annotations

import json
import uuid

import pika
import psycopg
import pytest

from consumer.ops import actions, dead_queue
from tests.support import declare_queues, get_all, publish_raw, queue_depth


def insert(conn: psycopg.Connection, status: str, error_code: int | None = None) -> uuid.UUID:
    notification_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO notification (id, body, status) VALUES (%s, 'hi', %s)",
        (notification_id, status))
    conn.execute(
        """INSERT INTO sms_notification (notification_id, to_phone_number, attempts, error_code)
           VALUES (%s, '+14155550123', 3, %s)""", (notification_id, error_code))
    return notification_id


def statuses(conn: psycopg.Connection) -> dict[uuid.UUID, tuple[str, int]]:
    return {row[0]: (row[1], row[2]) for row in conn.execute(
        """SELECT id, status, attempts FROM notification
           JOIN sms_notification ON notification_id = id""")}


def test_retry_returns_errored_and_failed_to_pending_with_fresh_attempts(settings):
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        errored, failed = insert(conn, "errored", 21611), insert(conn, "failed")
        sent, processing = insert(conn, "sent"), insert(conn, "processing")
        conn.execute("LISTEN smsq_due")
        retried = actions.retry(conn)
        assert sorted(retried) == sorted([errored, failed])
        assert statuses(conn) == {errored: ("pending", 0), failed: ("pending", 0),
                                  sent: ("sent", 3), processing: ("processing", 3)}
        assert [n.channel for n in conn.notifies(timeout=1, stop_after=1)] == ["smsq_due"]


def test_retry_filters_by_id_and_error_code(settings):
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        full_queue, bad_number = insert(conn, "errored", 21611), insert(conn, "errored", 21211)
        other = insert(conn, "errored", 21611)
        assert actions.retry(conn, error_code=21611, ids=[full_queue, bad_number]) == [full_queue]
        assert statuses(conn)[bad_number][0] == statuses(conn)[other][0] == "errored"


def test_retry_refuses_other_statuses(settings):
    with psycopg.connect(settings.database_dsn) as conn, pytest.raises(ValueError, match="sent"):
        actions.retry(conn, statuses=["sent"])


def test_cancel_only_touches_pending(settings):
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        pending, processing, sent = insert(conn, "pending"), insert(conn, "processing"), insert(conn, "sent")
        assert actions.cancel(conn, [pending, processing, sent]) == [pending]
        assert [statuses(conn)[i][0] for i in (pending, processing, sent)] == [
            "canceled", "processing", "sent"]


def _dead(settings, bodies: list[bytes]) -> None:
    declare_queues(settings)
    for number, body in enumerate(bodies):
        publish_raw(settings, [body], pika.BasicProperties(
            message_id=f"m{number}", headers={"x-error": f"body: reason {number}", "keep": "yes"}),
            exchange="", routing_key=settings.dead_queue)


def test_dead_letters_are_listed_without_being_consumed(settings):
    _dead(settings, [b"one", b"two", b"three"])
    listed = dead_queue.list_dead(settings, limit=2)
    assert [(d.key, d.reason, d.body) for d in listed] == [
        ("m0", "body: reason 0", b"one"), ("m1", "body: reason 1", b"two")]
    assert [body for _, body in get_all(settings, settings.dead_queue)] == [b"one", b"two", b"three"]


def test_requeue_sends_chosen_dead_letters_back_without_the_error(settings):
    _dead(settings, [b"one", json.dumps({"fixed": True}).encode(), b"three"])
    assert dead_queue.requeue(settings, keys={"m1"}) == ["m1"]
    assert queue_depth(settings, settings.dead_queue) == 2
    [(props, body)] = get_all(settings, settings.smsq_queue)
    assert body == b'{"fixed": true}'
    assert "x-error" not in props.headers and props.headers["keep"] == "yes"
    assert props.headers["x-smsq-requeued"] == 1
    assert dead_queue.requeue(settings) == ["m0", "m2"]
    assert queue_depth(settings, settings.dead_queue) == 0
