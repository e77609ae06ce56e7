"""smsq consume against the real RabbitMQ and Postgres."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator

import pika
import psycopg
import pytest

from consumer.ingest import Ingester
from consumer.settings import Settings
from consumer.signals import StopSignal
from tests.support import count_rows, get_all, publish_raw, queue_depth, wait_until

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
    """smsq consume running in a thread of this test, stopped (and checked) at the end."""
    stop = StopSignal()
    ingester = Ingester(settings, stop)
    thread = threading.Thread(target=ingester.run, daemon=True)
    thread.start()
    wait_until(lambda: ingester.consumer_tag, message="consumer to start")
    yield ingester
    stop.request()
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


def test_a_duplicate_id_is_acknowledged_and_stored_once(settings, consumer):
    message = json.dumps(simple()).encode()
    publish_raw(settings, [message, message])
    wait_until(lambda: queue_depth(settings, settings.smsq_queue) == 0, message="queue drained")
    publish_raw(settings, [message])
    wait_until(lambda: queue_depth(settings, settings.smsq_queue) == 0, message="queue drained")
    assert count_rows(settings) == 1


def test_message_without_id_or_properties_takes_its_id_from_the_body(settings, consumer):
    """As published by hand from RabbitMQ's management UI: no content type, no message id."""
    body = json.dumps({"body": "from the UI", "sms": {"to_phone_number": "+14155550123"}}).encode()
    publish_raw(settings, [body, body], pika.BasicProperties(),
                exchange="", routing_key=settings.smsq_queue)
    wait_until(lambda: queue_depth(settings, settings.smsq_queue) == 0, message="queue drained")
    assert count_rows(settings) == 1


def test_message_id_property_is_the_id_when_the_body_has_none(settings, consumer):
    given = uuid.uuid4()
    body = json.dumps({"body": "hi", "sms": {"to_phone_number": "+14155550123"}}).encode()
    publish_raw(settings, [body], pika.BasicProperties(message_id=str(given)))
    wait_until(lambda: count_rows(settings, f"id = '{given}'") == 1, message="stored by message_id")
