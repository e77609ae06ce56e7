"""The operator commands against the real Postgres and RabbitMQ: status, retry, cancel, dead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import pika
import psycopg
import pytest

from consumer import amqp, pipeline
from consumer.cli import run_with
from consumer.commands import UsageError, arguments
from consumer.commands.table import render_table
from consumer.ops import actions
from tests.support import declare_queues, env_of, publish_raw, queue_depth


@pytest.fixture
def smsq(settings, capsys):
    """Run `smsq <argv>` in-process with this test's settings: (exit status, stdout)."""
    def run(*argv: str) -> tuple[int, str]:
        status = run_with(settings, list(argv))
        return status, capsys.readouterr().out
    return run


@pytest.fixture
def db(settings):
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        yield conn


def insert(conn, status: str, priority: str = "low", error_code: int | None = None,
           age: timedelta = timedelta(0)) -> uuid.UUID:
    notification_id = uuid.uuid4()
    conn.execute(
        """INSERT INTO notification (id, body, status, priority, publish_datetime, created_datetime)
           VALUES (%s, 'hi', %s, %s, now() - %s, now() - %s)""",
        (notification_id, status, priority, age, age))
    conn.execute("INSERT INTO sms_notification (notification_id, to_phone_number, error_code) "
                 "VALUES (%s, '+14155550123', %s)", (notification_id, error_code))
    return notification_id


def status_of(conn, notification_id: uuid.UUID) -> str:
    return conn.execute("SELECT status FROM notification WHERE id = %s",
                        (notification_id,)).fetchone()[0]


def test_status_reports_counts_oldest_due_queues_and_each_senders_bucket(smsq, db, settings):
    insert(db, "pending", "high", age=timedelta(minutes=5))
    insert(db, "pending", "low")
    insert(db, "errored", "medium", error_code=21211)
    db.execute("""INSERT INTO dispatch_sender (sender, address, holder, tokens, rate, capacity,
                  updated_datetime) VALUES ('', '+15005550006', 'host:42', 0.5, 1, 3,
                  now() - interval '1 second')""")
    declare_queues(settings)
    publish_raw(settings, [b"not json"], exchange="", routing_key=settings.dead_queue)

    code, out = smsq("status", "--json")
    report = json.loads(out)

    assert code == 0
    assert report["notifications"]["pending"] == {"high": 1, "medium": 0, "low": 1}
    assert report["notifications"]["errored"]["medium"] == 1
    assert 299 < report["oldest_due_age_seconds"] < 3600
    assert report["queues"] == {settings.smsq_queue: 0, settings.dead_queue: 1}
    [bucket] = report["senders"]
    assert (bucket["address"], bucket["holder"], bucket["rate"], bucket["capacity"]) == (
        "+15005550006", "host:42", 1, 3)
    assert 1.5 <= bucket["tokens_now"] <= 3

    code, out = smsq("status")
    assert "+15005550006" in out and "host:42" in out and "1 message(s) ready" in out


def test_tokens_now_refills_at_the_rate_up_to_capacity(db):
    with db.transaction():  # one now() for the writing and the reading: no time passes
        db.execute("""INSERT INTO dispatch_sender (sender, address, tokens, rate, capacity,
                      updated_datetime) VALUES
                      ('a', 'a', 0.5, 2, 3, now() - interval '0.5 seconds'),
                      ('b', 'b', 0.5, 2, 3, now() - interval '60 seconds')""")
        buckets = {b["sender"]: b["tokens_now"] for b in pipeline.sender_buckets(db)}
    assert buckets == {"a": 1.5, "b": 3.0}


def test_retry_by_filter_touches_only_the_matching_rows(smsq, db):
    queue_full = insert(db, "errored", error_code=21611)
    old_queue_full = insert(db, "errored", error_code=21611, age=timedelta(days=2))
    bad_number = insert(db, "errored", error_code=21211)
    crashed = insert(db, "failed")

    code, out = smsq("retry", "--status", "errored", "--error-code", "21611", "--since", "1d",
                     "--json")

    assert (code, json.loads(out)) == (0, {"retried": [str(queue_full)], "not_retried": []})
    assert [status_of(db, i) for i in (queue_full, old_queue_full, bad_number, crashed)] == [
        "pending", "errored", "errored", "failed"]


def test_status_says_which_dispatchers_are_alive_by_their_lock_connections(smsq, db, settings):
    db.execute("""INSERT INTO dispatcher (holder, senders_held, stopped_datetime) VALUES
                  ('host:1', 3, NULL), ('host:2', 2, NULL), ('host:3', 0, now())""")
    # host:1's lock connection is open; host:2 died without a word (its row says 2 senders).
    with psycopg.connect(settings.database_dsn,
                         application_name=pipeline.LOCK_CONNECTION_PREFIX + "host:1"):
        code, out = smsq("status", "--json")
        states = {d["holder"]: (d["alive"], d["stopped_datetime"] is not None)
                  for d in json.loads(out)["dispatchers"]}
        code, text = smsq("status")
    assert code == 0
    assert states == {"host:1": (True, False), "host:2": (False, False),
                      "host:3": (False, True)}
    rows = {line.split()[0]: line.split()[1:3] for line in text.splitlines()
            if line.startswith("host:")}
    assert rows == {"host:1": ["alive", "3"], "host:2": ["dead", "0"],
                    "host:3": ["stopped", "0"]}


def test_retry_undelivered_sends_again_only_sent_ones_whose_delivery_failed(smsq, db):
    undelivered, delivered, errored = insert(db, "sent"), insert(db, "sent"), insert(db, "errored")
    for notification_id, sid, delivery in ((undelivered, "SM" + "1" * 32, "undelivered"),
                                           (delivered, "SM" + "2" * 32, "delivered")):
        db.execute("UPDATE sms_notification SET twilio_sid = %s, delivery_status = %s, "
                   "error_code = 30003 WHERE notification_id = %s",
                   (sid, delivery, notification_id))
    code, out = smsq("retry", "--undelivered", str(undelivered), str(delivered), str(errored),
                     "--json")
    assert code == 1
    assert json.loads(out) == {"retried": [str(undelivered)],
                               "not_retried": [str(delivered), str(errored)]}
    assert [status_of(db, i) for i in (undelivered, delivered, errored)] == [
        "pending", "sent", "errored"]
    with pytest.raises(UsageError, match="--status does not apply"):
        smsq("retry", "--undelivered", "--status", "errored", "--all")


def test_retry_by_id_and_all(smsq, db):
    first, second, sent = insert(db, "failed"), insert(db, "errored"), insert(db, "sent")
    code, out = smsq("retry", str(first))
    assert code == 0 and f"1 notification(s) back to pending\n  {first}" in out
    assert "not retried" not in out
    code, out = smsq("retry", "--all", "--json")
    assert json.loads(out) == {"retried": [str(second)], "not_retried": []}
    assert status_of(db, sent) == "sent"


def test_retry_says_which_ids_it_could_not_retry(smsq, db):
    failed, sent, unknown = insert(db, "failed"), insert(db, "sent"), uuid.uuid4()
    code, out = smsq("retry", str(failed), str(sent), str(unknown))
    assert code == 1
    assert out.endswith(f"2 not retried (only errored or failed ones matching the filter can "
                        f"be)\n  {sent}  sent\n  {unknown}  unknown\n")
    code, out = smsq("retry", str(sent), "--json")
    assert (code, json.loads(out)) == (1, {"retried": [], "not_retried": [str(sent)]})
    assert status_of(db, sent) == "sent"


def test_retry_without_a_selection_is_a_usage_error(smsq, db):
    insert(db, "errored")
    with pytest.raises(UsageError, match="--all"):
        smsq("retry")


def test_cancel_cancels_pending_and_says_which_it_could_not(smsq, db):
    pending, sent, unknown = insert(db, "pending"), insert(db, "sent"), uuid.uuid4()
    code, out = smsq("cancel", str(pending), str(sent), str(unknown), "--json")
    assert code == 1
    assert json.loads(out) == {"canceled": [str(pending)],
                               "not_canceled": [str(sent), str(unknown)]}
    assert (status_of(db, pending), status_of(db, sent)) == ("canceled", "sent")
    code, out = smsq("cancel", str(pending), str(unknown))
    assert (code, out) == (1, f"0 notification(s) canceled\n2 not canceled (only pending ones "
                              f"can be)\n  {pending}  canceled\n  {unknown}  unknown\n")


def test_cancel_refuses_what_is_not_an_id(smsq, db):
    with pytest.raises(UsageError, match="not a notification id"):
        smsq("cancel", "12345")


def dead_letter(settings, key: str, reason: str, body: bytes) -> None:
    declare_queues(settings)
    publish_raw(settings, [body], pika.BasicProperties(message_id=key, headers={"x-error": reason}),
                exchange="", routing_key=settings.dead_queue)


def test_dead_list_shows_each_reason_and_leaves_them_queued(smsq, settings):
    dead_letter(settings, "k1", "sms.to_phone_number: not a valid phone number: '+1123'", b"{}")
    dead_letter(settings, "k2", "body: field required", b'{"sms": {}}')

    code, out = smsq("dead", "list")
    assert code == 0
    assert "k1" in out and "not a valid phone number" in out and "body: field required" in out
    code, out = smsq("dead", "list", "--json")
    assert [(d["key"], d["body"]) for d in json.loads(out)] == [("k1", "{}"), ("k2", '{"sms": {}}')]
    assert queue_depth(settings, settings.dead_queue) == 2


def test_dead_list_of_a_queue_never_declared_is_empty_and_declares_nothing(smsq, settings):
    code, out = smsq("dead", "list", "--json")
    assert code == 0 and json.loads(out) == []
    with amqp.connect(settings, "test") as connection:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            connection.channel().queue_declare(settings.dead_queue, passive=True)


def test_dead_requeue_by_key_then_all(smsq, settings):
    for key in ("k1", "k2", "k3"):
        dead_letter(settings, key, "body: field required", key.encode())

    code, out = smsq("dead", "requeue", "k2", "nope", "--json")
    assert (code, json.loads(out)) == (1, {"requeued": ["k2"], "not_found": ["nope"]})
    assert queue_depth(settings, settings.dead_queue) == 2
    code, out = smsq("dead", "requeue", "--all")
    assert code == 0 and "2 dead letter(s) sent back" in out
    assert queue_depth(settings, settings.dead_queue) == 0
    assert queue_depth(settings, settings.smsq_queue) == 3


def test_dead_requeue_needs_keys_or_all(smsq, settings):
    with pytest.raises(UsageError):
        smsq("dead", "requeue")


def test_since_reads_durations_and_zoned_times():
    now = datetime(2026, 11, 25, 12, tzinfo=timezone.utc)
    assert arguments.since("90m", now) == now - timedelta(minutes=90)
    assert arguments.since("2026-11-25T10:00:00Z", now) == now - timedelta(hours=2)
    with pytest.raises(UsageError, match="time zone"):
        arguments.since("2026-11-25T10:00:00", now)
    with pytest.raises(UsageError):
        arguments.since("yesterday", now)


def test_tables_align_numbers_right_and_text_left():
    assert render_table(["name", "n"], [("a", 1), ("bbb", 22)]).splitlines() == [
        "name   n", "a      1", "bbb   22"]


@pytest.mark.parametrize("ids", [1, 3000])  # less, and more, than stdout buffers
def test_a_reader_leaving_early_ends_the_command_without_a_traceback(settings, ids):
    """`smsq retry ... | head -1`: the pipe closes before smsq writes."""
    reader, writer = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "retry", *(str(uuid.uuid4()) for _ in range(ids))],
        env={k: v for k, v in env_of(settings).items() if k != "PYTHONUNBUFFERED"},
        stdout=writer, stderr=subprocess.PIPE)
    os.close(writer)
    os.close(reader)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 1
    assert errors == b""


def test_prune_deletes_old_finished_notifications_with_their_details_and_history(smsq, db):
    old = timedelta(days=100)
    doomed = [insert(db, status, age=old) for status in ("errored", "failed", "canceled")]
    sent = insert(db, "processing", age=old)
    db.execute("UPDATE notification SET status = 'sent' WHERE id = %s", (sent,))
    doomed.append(sent)
    kept = {insert(db, "pending", age=old), insert(db, "processing", age=old),
            insert(db, "sent", age=timedelta(days=10))}
    history = "SELECT count(*) FROM notification_event WHERE notification_id = ANY(%s)"
    assert db.execute(history, (doomed,)).fetchone()[0] == 1

    code, out = smsq("prune", "--older-than", "90d", "--dry-run", "--json")
    assert (code, json.loads(out)["notifications"]) == (0, 4)
    assert db.execute("SELECT count(*) FROM notification").fetchone()[0] == 7

    code, out = smsq("prune", "--older-than", "90d", "--batch-size", "3")  # two batches
    assert code == 0 and out.startswith("deleted 4 finished notification(s) created before ")
    assert {row[0] for row in db.execute("SELECT id FROM notification")} == kept
    assert db.execute("SELECT count(*) FROM sms_notification").fetchone()[0] == 3
    assert db.execute(history, (doomed,)).fetchone()[0] == 0
    assert {status: sum(row.values()) for status, row in pipeline.counts_table(db).items()} == {
        "pending": 1, "processing": 1, "sent": 1, "errored": 0, "failed": 0, "canceled": 0}


def test_prune_takes_the_oldest_through_the_finished_index(db):
    """Even in a generic plan, as Postgres caches for a statement run again and again (a
    status list given as a parameter could not use the partial index there)."""
    statement = actions._PRUNE_BATCH.replace("%(before)s", "$1").replace(
        "%(after)s", "$2").replace("%(batch)s", "$3")
    db.execute(f"PREPARE prune_batch (timestamptz, timestamptz, int) AS {statement}")
    db.execute("SET plan_cache_mode = force_generic_plan")
    plan = "\n".join(row[0] for row in db.execute(
        "EXPLAIN EXECUTE prune_batch (now(), '-infinity', 10)"))
    assert "notification_finished_idx" in plan


def test_prune_needs_a_point_in_time(smsq, db):
    with pytest.raises(UsageError, match="--older-than: not a duration"):
        smsq("prune", "--older-than", "ninety days")


def test_retry_since_a_time_finds_errored_rows_through_the_finished_index(db):
    db.execute("SET enable_seqscan = off")  # an empty table: show what the index allows
    plan = "\n".join(row[0] for row in db.execute("EXPLAIN " + actions._RETRY, {
        "statuses": list(actions.RETRYABLE), "ids": None, "error_code": None,
        "since": datetime.now(timezone.utc) - timedelta(hours=2)}))
    assert "notification_finished_idx" in plan
