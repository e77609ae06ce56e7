"""smsq consume against the real RabbitMQ and Postgres."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta, timezone

import pika
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_of_hypothesis
from hypothesis import strategies as st
from pydantic import PostgresDsn

import schemas.errors
from consumer import amqp, pipeline
from consumer.ingest import consume as ingest
from consumer.ingest import writer
from consumer.ingest.consume import Ingester
from consumer.ingest.delivery_reader import DeliveryReader
from consumer.settings import Settings
from consumer.signals import StopSignal
from schemas.message import derive_id
from tests.support import (
    close_amqp_connections_of,
    count_rows,
    declare_queues,
    get_all,
    ingest_row,
    publish_raw,
    queue_depth,
    wait_until,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()

FULL = {
    "id": "0b9a3c1e-6f0d-4a51-9d57-2f0c6d3e9a11",
    "type": "sms",
    "user_id": "42",
    "title": "Your verification code",
    "body": "Your one-time code is 482910. It expires in 10 minutes.",
    "url": "https://example.com/orders/42",
    "priority": "high",
    "publish_datetime": "2026-11-24T12:00:00Z",
    "expire_datetime": "2026-11-24T12:10:00Z",
    "content_type": "shop.order",
    "object_id": "42",
    "sms": {
        "to_phone_number": "+1 (415) 555-0123",
        "media_url": ["https://example.com/label.png"],
        "temporary_media": {"name": "label.png", "content_type": "image/png",
                            "content_base64": PNG},
    },
}


@pytest.fixture
def consumer(settings: Settings) -> Iterator[Ingester]:
    with running(Ingester(settings, StopSignal())) as ingester:
        yield ingester


@contextmanager
def running(ingester: Ingester) -> Iterator[Ingester]:
    """smsq consume running in a thread of this test, stopped (and checked) at the end."""
    thread = threading.Thread(target=ingester.run, daemon=True)
    thread.start()
    wait_until(lambda: ingester.consumer_tag, message="consumer to start")
    yield ingester
    assert thread.is_alive(), "the consumer died during the test"
    ingester.stop.request()
    thread.join(timeout=10)
    assert not thread.is_alive(), "consumer did not stop within 10 s"


def simple(**changes) -> dict:
    message = {"id": str(uuid.uuid4()), "body": "hello", "sms": {"to_phone_number": "+14155550123"}}
    message.update(changes)
    return message


def test_every_field_of_a_full_message_is_stored(settings, consumer):
    publish_raw(settings, [json.dumps(FULL).encode()])
    wait_until(lambda: count_rows(settings) == 1, message="the message to be stored")
    with psycopg.connect(settings.database_dsn) as conn:
        n = conn.execute(
            """SELECT n.id::text, type, user_id, title, body, url, priority, status,
                      n.publish_datetime::text, n.expire_datetime::text, n.content_type, object_id,
                      to_phone_number, media_url, m.name, m.content_type, m.content,
                      length(m.access_token)
               FROM notification n JOIN sms_notification s ON s.notification_id = n.id
               JOIN sms_temporary_media m ON m.id = s.temporary_media_id""").fetchone()
    assert n == (
        FULL["id"], "sms", "42", FULL["title"], FULL["body"], FULL["url"], "high", "pending",
        "2026-11-24 12:00:00+00", "2026-11-24 12:10:00+00", "shop.order", "42",
        "+14155550123", ["https://example.com/label.png"], "label.png", "image/png",
        base64.b64decode(PNG), 32)
    assert queue_depth(settings, settings.smsq_queue) == 0


BAD_INPUT = [
    (b"not json", "message: not valid JSON"),
    (b"[1]", "message: must be a JSON object"),
    (b"\xc3\x28 not utf-8", "message: not UTF-8 text"),
    (json.dumps({"sms": {"to_phone_number": "+14155550123"}}).encode(), "body: required field is missing"),
    (json.dumps(simple(body="x" * 1601)).encode(), "body: at most 1600 characters"),
    (json.dumps(simple(title="t" * 125)).encode(), "title: at most 124 characters"),
    (json.dumps(simple(sms={"to_phone_number": "+1123"})).encode(),
     "sms.to_phone_number: not a valid phone number: '+1123'"),
    (json.dumps(simple(publish_datetime="2026-11-24T12:00:00")).encode(), "publish_datetime: needs a time zone"),
    (json.dumps(simple(colour="red")).encode(), "colour: unknown field"),
    (json.dumps(simple(type="push")).encode(), "type: channel 'push' is not served here"),
    (json.dumps(simple(sms={"to_phone_number": "+14155550123",
                            "media_url": ["https://e.com/a.png"] * 11})).encode(),
     "sms.media_url: at most 10 items"),
    (json.dumps(simple(sms={"to_phone_number": "+14155550123",
                            "media_url": "file:///etc/passwd"})).encode(),
     "sms.media_url: must be an http or https URL"),
    (json.dumps(simple(sms={"to_phone_number": "+14155550123", "temporary_media": {
        "name": "big.png", "content_type": "image/png",
        "content_base64": base64.b64encode(b"\0" * (5 * 1024 * 1024 + 3)).decode()}})).encode(),
     "sms.temporary_media.content_base64: larger than 5 MB"),
]


def test_bad_input_is_dead_lettered_unchanged_with_the_reason(settings, consumer):
    properties = pika.BasicProperties(delivery_mode=2, headers={"trace": "abc"})
    publish_raw(settings, [body for body, _ in BAD_INPUT], properties)
    publish_raw(settings, [json.dumps(simple()).encode()])  # a good one after them
    wait_until(lambda: count_rows(settings) == 1, message="the good message")
    wait_until(lambda: queue_depth(settings, settings.dead_queue) == len(BAD_INPUT),
               message="all bad messages dead-lettered")
    dead = get_all(settings, settings.dead_queue)
    assert [body for _, body in dead] == [body for body, _ in BAD_INPUT]
    for (props, _), (_, expected) in zip(dead, BAD_INPUT):
        assert expected in props.headers["x-error"]
        assert props.headers["trace"] == "abc"
        assert props.delivery_mode == 2
    assert queue_depth(settings, settings.smsq_queue) == 0


def store_and_wait(settings: Settings, bodies: list[bytes], **publish) -> None:
    """Publish, then a marker; batches commit in queue order, so the marker comes last."""
    marker = simple()
    publish_raw(settings, bodies, **publish)
    publish_raw(settings, [json.dumps(marker).encode()])
    wait_until(lambda: count_rows(settings, f"id = '{marker['id']}'") == 1, message="marker")



def test_quorum_queues_are_declared_and_consumed(settings):
    """SMSQ_QUORUM_QUEUES=true, on the single local node as on a cluster: both queues are
    quorum queues, and messages go through them as through classic ones."""
    settings = settings.model_copy(update={"smsq_quorum_queues": True})
    message = simple()
    with running(Ingester(settings, StopSignal())):
        store_and_wait(settings, [json.dumps(message).encode(), b"not json"])
        wait_until(lambda: queue_depth(settings, settings.dead_queue) == 1,
                   message="the bad one dead-lettered")
    assert queue_types(settings.smsq_queue, settings.dead_queue) == ["quorum", "quorum"]
    assert count_rows(settings, f"id = '{message['id']}'") == 1
    assert queue_depth(settings, settings.smsq_queue) == 0


def queue_types(*queues: str) -> list[str]:
    """Each queue's type (classic, quorum, stream), as the broker itself reports it."""
    listed = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers",
                             "name", "type"], check=True, capture_output=True, text=True).stdout
    types = dict(line.split("\t") for line in listed.splitlines())
    return [types.get(queue) for queue in queues]

@pytest.mark.parametrize("reader_attaches", [True, False])
def test_deliveries_come_through_the_reader_or_else_through_pika(
        settings, monkeypatch, reader_attaches):
    if not reader_attaches:  # a pika without the reader's hook
        monkeypatch.setattr(DeliveryReader, "attach", classmethod(lambda cls, *args: None))
    through_pika, on_message = [], Ingester._on_message

    def on_message_from_pika(self, channel, method, properties, body) -> None:
        through_pika.append(method.delivery_tag)
        on_message(self, channel, method, properties, body)

    monkeypatch.setattr(Ingester, "_on_message", on_message_from_pika)
    with running(Ingester(settings, StopSignal())) as ingester:
        store_and_wait(settings, [json.dumps(simple()).encode()])
        assert (ingester.reader is not None) == reader_attaches
    assert count_rows(settings) == 2  # the message and store_and_wait's marker
    assert len(through_pika) == (0 if reader_attaches else 2)


def test_a_duplicate_id_is_acknowledged_and_stored_once(settings, consumer, caplog):
    caplog.set_level("INFO", logger="consumer.ingest")
    message = simple()
    store_and_wait(settings, [json.dumps(message).encode()] * 2)
    store_and_wait(settings, [json.dumps(message).encode()])
    assert count_rows(settings, f"id = '{message['id']}'") == 1
    told = [r for r in caplog.records if getattr(r, "action", "") == "duplicates_acknowledged"]
    assert [(r.count, r.ids) for r in told] == [(1, message["id"])] * 2
    assert count_rows(settings) == 3  # and the two markers
    wait_until(lambda: queue_depth(settings, settings.smsq_queue) == 0, message="queue drained")


def test_message_without_id_or_properties_takes_its_id_from_the_body(settings, consumer):
    """As published by hand from RabbitMQ's management UI: no content type, no message id."""
    body = json.dumps({"body": "from the UI", "sms": {"to_phone_number": "+14155550123"}}).encode()
    store_and_wait(settings, [body, body], properties=pika.BasicProperties(),
                   exchange="", routing_key=settings.smsq_queue)
    assert count_rows(settings, f"id = '{derive_id(None, body)}'") == 1
    assert count_rows(settings) == 2  # and the marker


def test_message_id_property_is_the_id_when_the_body_has_none(settings, consumer):
    given = uuid.uuid4()
    body = json.dumps({"body": "hi", "sms": {"to_phone_number": "+14155550123"}}).encode()
    publish_raw(settings, [body], pika.BasicProperties(message_id=str(given)))
    wait_until(lambda: count_rows(settings, f"id = '{given}'") == 1, message="stored by message_id")


# -- arbitrary input --------------------------------------------------------------------------

_JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_JSON = st.recursive(_JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_ZONES = st.sampled_from([None, timezone.utc, timezone(timedelta(hours=-5, minutes=-30))])
_DATETIMES = st.builds(lambda d, z: d.replace(tzinfo=z).isoformat(), st.datetimes(), _ZONES)
_PHONES = st.sampled_from(["+14155550123", "+1 (415) 555-0123", "+1123", "+11234567890",
                           "4155550123", "+442071838750", ""]) | st.text(max_size=16)
_SMS = st.fixed_dictionaries({}, optional={
    "to_phone_number": _PHONES | _JSON,
    "media_url": st.sampled_from(["https://e.com/a.png", "ftp://e.com/a", ["http://e.com/b"]])
    | _JSON,
    "temporary_media": st.fixed_dictionaries({}, optional={
        "name": st.text(max_size=8), "content_type": st.sampled_from(["image/png", "text/x"]),
        "content_base64": st.sampled_from([PNG, "not base64!", ""])}) | _JSON,
    "extra": _JSON,
})
# Near the message format (no "id": each message takes its id from its unique message_id).
_MESSAGES = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["sms", "email", "fax"]) | _JSON,
    "user_id": st.text(max_size=8) | _JSON,
    "title": st.text(max_size=130),
    "body": st.text(max_size=30) | st.text(min_size=1595, max_size=1605) | _JSON,
    "url": st.text(max_size=10) | _JSON,
    "priority": st.sampled_from(["low", "medium", "high", "urgent"]) | _JSON,
    "publish_datetime": _DATETIMES | _JSON,
    "expire_datetime": _DATETIMES,
    "content_type": st.text(max_size=8),
    "sms": _SMS | _JSON,
    "colour": _JSON,
})
_AWARE = st.builds(lambda d, z: d.replace(tzinfo=z).isoformat(), st.datetimes(),
                   _ZONES.filter(lambda zone: zone is not None))
_VALID_ENOUGH = st.fixed_dictionaries({
    "body": st.text(min_size=1, max_size=40),
    "sms": st.fixed_dictionaries({"to_phone_number": st.sampled_from(
        ["+14155550123", "+1 (415) 555-0123", "+442071838750"])}),
}, optional={"title": st.text(max_size=124), "priority": st.sampled_from(["low", "high"]),
             "publish_datetime": _AWARE, "user_id": st.text(max_size=8)})
_DOCUMENTS = (_MESSAGES | _VALID_ENOUGH).map(lambda m: json.dumps(m).encode())
_BODIES = st.one_of(
    st.binary(max_size=300),
    _DOCUMENTS,
    _DOCUMENTS.flatmap(lambda doc: st.integers(0, len(doc)).map(lambda cut: doc[:cut])),
    _DOCUMENTS.map(lambda doc: doc.decode().encode("utf-16")),
)


@settings_of_hypothesis(max_examples=40, deadline=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture,
                                               HealthCheck.too_slow])
@given(bodies=st.lists(_BODIES, min_size=1, max_size=5))
def test_arbitrary_bytes_end_stored_or_dead_lettered(settings, consumer, outcomes, bodies):
    mine = {uuid.uuid4(): body for body in bodies}
    for message_id, body in mine.items():
        publish_raw(settings, [body], pika.BasicProperties(message_id=str(message_id)))

    def accounted() -> bool:
        outcomes["dead"].update(uuid.UUID(props.message_id)
                                for props, _ in get_all(settings, settings.dead_queue))
        with psycopg.connect(settings.database_dsn) as conn:
            outcomes["stored"].update(row[0] for row in conn.execute(
                "SELECT id FROM notification WHERE id = ANY(%s)", (list(mine),)))
        return set(mine) <= outcomes["stored"] | outcomes["dead"]

    wait_until(accounted, message="every message stored or dead-lettered")
    assert not outcomes["stored"] & outcomes["dead"]  # and the consumer lives on: see its fixture


@pytest.fixture(scope="module")
def outcomes() -> Iterator[dict[str, set[uuid.UUID]]]:
    """Ids stored and ids dead-lettered over all the examples; both paths must be taken."""
    tally: dict[str, set[uuid.UUID]] = {"stored": set(), "dead": set()}
    yield tally
    assert tally["stored"] and tally["dead"], {k: len(v) for k, v in tally.items()}


def test_a_message_postgres_refuses_is_dead_lettered_and_spoils_nothing(
        settings, consumer, monkeypatch):
    """A value validation lets slip through and Postgres refuses: here a NUL character,
    which Postgres text cannot hold, with validation's check for it switched off."""
    monkeypatch.setattr(schemas.errors, "problem_in", lambda raw, notification: None)
    good = [simple(), simple()]
    refused = json.dumps(simple(body="nul \u0000 inside")).encode()
    store_and_wait(settings, [json.dumps(good[0]).encode(), refused, json.dumps(good[1]).encode()])
    assert count_rows(settings, f"id in ('{good[0]['id']}', '{good[1]['id']}')") == 2
    [(props, body)] = get_all(settings, settings.dead_queue)
    assert body == refused
    assert props.headers["x-error"].startswith("message: refused by the database")


def test_media_expiring_at_the_end_of_time_is_stored(settings, consumer):
    message = simple(expire_datetime="9999-12-30T09:59:59-14:00", sms={
        "to_phone_number": "+14155550123",
        "temporary_media": {"name": "a.png", "content_type": "image/png", "content_base64": PNG}})
    store_and_wait(settings, [json.dumps(message).encode()])
    assert count_rows(settings, f"id = '{message['id']}'") == 1


def queue_big_messages(settings: Settings, monkeypatch, count: int) -> list[bytes]:
    """`count` messages of 270 KB queued, with a byte bound of 1 MB (batches of 256 KB)."""
    monkeypatch.setattr(ingest, "MAX_HELD_BYTES", 2**20)
    monkeypatch.setattr(ingest, "MAX_BATCH_BYTES", 2**18)
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(200_000)).decode()
    bodies = [json.dumps(simple(sms={"to_phone_number": "+14155550123", "temporary_media": {
        "name": "a.png", "content_type": "image/png", "content_base64": image}})).encode()
        for _ in range(count)]
    declare_queues(settings)
    publish_raw(settings, bodies)
    return bodies


def test_holding_too_many_bytes_pauses_reading_until_they_are_stored(settings, monkeypatch):
    """The prefetch counts messages, and inline media makes one 5 MB: memory is bounded in
    bytes too. All queued before consuming starts, the broker sends them at once; the
    consumer reads them as the writer stores, and none is handed back to be delivered again."""
    bodies = queue_big_messages(settings, monkeypatch, 40)

    ingester = Ingester(settings, StopSignal())
    peak_held, redelivered = 0, []
    take, read = ingester._take, DeliveryReader.take

    def take_and_look(tag, properties, body) -> None:
        nonlocal peak_held
        take(tag, properties, body)
        peak_held = max(peak_held, ingester.held_bytes)

    def read_and_look(reader) -> list:
        deliveries = read(reader)
        redelivered.extend(again for _, again, _, _ in deliveries)
        return deliveries

    ingester._take = take_and_look
    monkeypatch.setattr(DeliveryReader, "take", read_and_look)
    with running(ingester):
        wait_until(lambda: count_rows(settings) == 40, message="every message stored")
        # The bound, plus what one look at the socket reads (pika: at most 100 KB) and the
        # message it completes.
        assert peak_held <= 2**20 + 100 * 1024 + len(bodies[0]), peak_held
        assert redelivered == [False] * 40
    # Stopped: whatever was left unacknowledged would be back in the queue now.
    assert queue_depth(settings, settings.smsq_queue) == 0
    assert queue_depth(settings, settings.dead_queue) == 0


def test_a_reconnect_during_a_postgres_outage_reads_nothing_while_old_batches_wait(
        settings, monkeypatch):
    """Batches handed over on a lost connection stay in memory until stored: they count."""
    queue_big_messages(settings, monkeypatch, 20)
    # A look every 2 s notices the lost connection soon; each reads at most 100 KB, so two
    # looks cannot complete one 270 KB message.
    monkeypatch.setattr(ingest, "HELD_WAKE_SECONDS", 2)
    postgres_away = settings.model_copy(
        update={"database_url": PostgresDsn("postgresql://postgres@127.0.0.1:1/smsq")})
    with running(Ingester(postgres_away, StopSignal())) as ingester:
        wait_until(lambda: ingester.held_bytes >= 2**20, message="the bound reached")
        first_tag = ingester.consumer_tag
        assert close_amqp_connections_of(os.getpid()) == 1
        wait_until(lambda: ingester.consumer_tag not in ("", first_tag), message="a reconnect")
        time.sleep(1)
        assert ingester.batch is None and not ingester.in_flight  # the new one took nothing
        assert ingester.held_bytes >= 2**20  # the old connection's batches still count


def test_after_a_batch_given_up_no_later_batch_is_acknowledged(settings):
    """Writers run side by side: stopping during an outage, a batch may be given up while a
    later one got stored. Acknowledging the later one (multiple=True) would acknowledge the
    given-up one too, and lose it: both must go back to the queue."""
    declare_queues(settings)
    publish_raw(settings, [json.dumps(simple()).encode() for _ in range(4)])
    ingester = Ingester(settings, StopSignal())
    assert ingester._open_amqp()

    def taken_all_four() -> bool:
        ingester._process_events(0.1)
        return ingester.batch is not None and len(ingester.batch) == 4

    try:
        wait_until(taken_all_four, message="4 deliveries")
        deliveries = ingester.batch.deliveries
        given_up = ingester_batch(ingester, deliveries[:2], writer.Outcome.ABANDONED)
        stored = ingester_batch(ingester, deliveries[2:], writer.Outcome.STORED)
        ingester.in_flight.extend([given_up, stored])
        ingester._acknowledge_done()
        assert not ingester.in_flight
    finally:
        ingester._close_amqp()
    wait_until(lambda: queue_depth(settings, settings.smsq_queue) == 4,
               message="all four back in the queue")


def ingester_batch(ingester: Ingester, deliveries, outcome) -> writer.Batch:
    return writer.Batch(ingester.amqp_connection, list(deliveries), outcome=outcome)


def test_a_deadlock_with_another_writer_is_retried_on_the_same_connection(settings, caplog):
    """Two writers storing the same ids in crossing order deadlock, and Postgres aborts one.
    That is no outage: the batch is tried again on its connection, and stored."""
    caplog.set_level("INFO", logger="consumer.ingest")
    first, second = ingest_row(), ingest_row()
    batch_writer = writer.BatchWriter(settings, StopSignal(), on_done=lambda _batch: None)
    session = writer.WriterSession(settings)
    connection = session.connection()
    batch = writer.Batch(None, [writer.Delivery(tag, b"", b"", row=row)
                                for tag, row in enumerate((first, second), start=1)])
    with psycopg.connect(settings.database_dsn) as other:
        # The writer's deadlock check (1 s) fires before this one's: the writer is aborted.
        other.execute("SET LOCAL deadlock_timeout = '10s'")
        insert_notification(other, second.id)
        storing = threading.Thread(target=batch_writer._store, args=(session, batch))
        storing.start()
        wait_until(lambda: waiting_on_a_lock(settings), message="the writer to wait on a lock")
        insert_notification(other, first.id)  # the crossing order: a deadlock
        other.rollback()
    storing.join(timeout=30)
    assert batch.outcome is writer.Outcome.STORED
    assert count_rows(settings) == 2
    assert session.db is connection and not connection.closed
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert "batch_conflict_retry" in actions and "postgres_retry" not in actions
    session.close()


def insert_notification(conn: psycopg.Connection, notification_id: uuid.UUID) -> None:
    conn.execute("INSERT INTO notification (id, body) VALUES (%s, 'x')", (notification_id,))


def waiting_on_a_lock(settings: Settings) -> bool:
    with psycopg.connect(settings.database_dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'smsq consume'"
            " AND wait_event_type = 'Lock' AND datname = current_database()").fetchone()[0] == 1


def test_a_deleted_queue_is_declared_again_and_consumed(settings, consumer, caplog):
    """Deleting the queue (from the management UI, say) cancels the consumer: consume must
    not sit there consuming nothing, but declare the queue again and go on."""
    caplog.set_level("WARNING", logger="consumer.ingest")
    first_tag = consumer.consumer_tag
    with amqp.connect(settings, "test") as connection:
        connection.channel().queue_delete(settings.smsq_queue)
    wait_until(lambda: consumer.consumer_tag != first_tag, message="a new consumer")
    wait_until(lambda: consumers_of(settings, settings.smsq_queue) == 1,
               message="the queue declared again and consumed")
    store_and_wait(settings, [json.dumps(simple()).encode()])
    assert any("cancelled the consumer" in getattr(r, "error", "") for r in caplog.records)


def consumers_of(settings: Settings, queue: str) -> int:
    with amqp.connect(settings, "test") as connection:
        try:
            return connection.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0  # not declared yet


def test_consume_folds_the_count_deltas_it_appends(settings, monkeypatch):
    """Without `smsq serve` (or a dispatcher) running, the deltas still stay few."""
    monkeypatch.setattr(pipeline, "FOLD_COUNTS_EVERY_SECONDS", 0.0)

    def deltas() -> list[tuple]:
        with psycopg.connect(settings.database_dsn) as conn:
            return conn.execute("SELECT status, priority, delta FROM notification_count_delta"
                                ).fetchall()

    with running(Ingester(settings, StopSignal())):
        for _ in range(3):  # a batch each: store_and_wait's marker commits after its message
            store_and_wait(settings, [json.dumps(simple()).encode()])
        wait_until(lambda: len(deltas()) == 1, message="deltas folded into one row")
    assert deltas() == [("pending", "low", 6)]
