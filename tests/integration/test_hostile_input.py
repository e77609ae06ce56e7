"""Odd messages that RabbitMQ accepts never stop `smsq consume` or `smsq dispatch`.

Both run as their own processes, with the sandbox (`smsq fake-twilio`) as Twilio. Each odd
message is published through the real broker, with odd AMQP properties and headers where the
case has them (bytes built by hand where pika refuses to encode a value), then a good
message. The case passes when both programs still run, the good message reached the
sandbox, and the odd one ended stored or dead-lettered with an x-error naming the problem.
Cases run in order against one pipeline; a program that died is started again for the next.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions
import psycopg
import pytest
from pika import spec

from consumer import sandbox as fake_twilio
from consumer.settings import Settings
from schemas.message import derive_id
from tests.conftest import cloned_database
from tests.dispatch_support import dispatch_settings
from tests.support import declare_queues, get_all, start_smsq, wait_until

pytestmark = pytest.mark.slow

TO = "+14155550123"
Props = spec.BasicProperties


def message(**changes) -> dict:
    return {"id": str(uuid.uuid4()), "body": "odd but fine", "sms": {"to_phone_number": TO}} | changes


def encoded(value: dict | str) -> bytes:
    return (value if isinstance(value, str) else json.dumps(value)).encode()


# -- AMQP properties as bytes, for values pika refuses to encode ------------------------------

def shortstr(text: bytes) -> bytes:
    return bytes([len(text)]) + text


def table(*fields: tuple[bytes, bytes, bytes]) -> bytes:
    """A field table from (name, type, encoded value)."""
    payload = b"".join(shortstr(name) + kind + value for name, kind, value in fields)
    return struct.pack(">I", len(payload)) + payload


def nested_table(depth: int) -> bytes:
    inner = table()
    for _ in range(depth):
        inner = table((b"n", b"F", inner))
    return inner


class RawProperties(pika.BasicProperties):
    """Properties sent exactly as these bytes: pika's content header frame wraps whatever
    `encode` returns."""

    def __init__(self, flags: int, *fields: bytes) -> None:
        super().__init__()
        self.raw = struct.pack(">H", flags) + b"".join(fields)

    def encode(self) -> list[bytes]:
        return [self.raw]


def with_headers(headers: bytes, message_id: bytes | None = None) -> RawProperties:
    flags = Props.FLAG_HEADERS | Props.FLAG_DELIVERY_MODE
    fields = [headers, b"\x02"]
    if message_id is not None:
        flags |= Props.FLAG_MESSAGE_ID
        fields.append(shortstr(message_id))
    return RawProperties(flags, *fields)


TIMESTAMP_BEYOND_DATETIME = table((b"when", b"T", struct.pack(">Q", 2**63 - 1)))
NAN_DOUBLE = table((b"ratio", b"d", struct.pack(">d", math.nan)))
INFINITE_DOUBLE = table((b"ratio", b"d", struct.pack(">d", math.inf)))
UNKNOWN_TYPE = table((b"odd", b"Z", b"\x00\x00"))
TRUNCATED = struct.pack(">I", 40) + shortstr(b"cut") + b"S" + struct.pack(">I", 30)
NON_UTF8 = table((b"\xff\xfekey", b"S", struct.pack(">I", 2) + b"\xff\xfe"),
                 (b"dec", b"D", b"\xff" + struct.pack(">i", 2**31 - 1)))
HUGE_HEADERS = table(*[(f"h{n}".encode(), b"S", struct.pack(">I", 1000) + b"x" * 1000)
                       for n in range(100)])


# -- the cases --------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    body: bytes
    properties: pika.BasicProperties = field(
        default_factory=lambda: pika.BasicProperties(delivery_mode=2))
    dead: str | None = None  # expected in x-error; None: stored
    stored_id: uuid.UUID | None = None  # the id it is stored under, when not in its body
    broker_may_refuse: bool = False  # RabbitMQ may close the connection instead
    marks: tuple = ()

    def param(self):
        return pytest.param(self, id=self.name, marks=self.marks)


VALID_NO_ID = encoded({"body": "no id in the body", "sms": {"to_phone_number": TO}})
INVALID = encoded({"body": "", "sms": {"to_phone_number": TO}})
PROPERTIES = "AMQP properties could not be decoded"

CASES = [
    # AMQP properties and headers (RabbitMQ passes on whatever a producer sent).
    Case("header timestamp beyond datetime, id in body", encoded(message()),
         with_headers(TIMESTAMP_BEYOND_DATETIME)),
    Case("header timestamp beyond datetime, no id", VALID_NO_ID,
         with_headers(TIMESTAMP_BEYOND_DATETIME), dead=f"message: carries no id, and its {PROPERTIES}"),
    Case("header timestamp beyond datetime, invalid body", INVALID,
         with_headers(TIMESTAMP_BEYOND_DATETIME), dead=f"body: must not be empty; message: its {PROPERTIES}"),
    # RabbitMQ 3.13 refuses these at publish (it closes the connection: 541 INTERNAL_ERROR);
    # a broker that passes them on must find the consumer ready for them too.
    Case("header double NaN, invalid body", INVALID, with_headers(NAN_DOUBLE), dead=PROPERTIES,
         broker_may_refuse=True),
    Case("header double infinity, no id", VALID_NO_ID, with_headers(INFINITE_DOUBLE),
         dead=PROPERTIES, broker_may_refuse=True),
    Case("header of an unknown field type, invalid body", INVALID, with_headers(UNKNOWN_TYPE),
         dead=PROPERTIES, broker_may_refuse=True),
    Case("header table cut short, invalid body", INVALID, with_headers(TRUNCATED),
         dead=PROPERTIES, broker_may_refuse=True),
    Case("header tables nested 5000 deep, no id", VALID_NO_ID, with_headers(nested_table(5000)),
         dead=f"{PROPERTIES} to look for a message_id (RecursionError"),
    Case("header tables nested 5000 deep, id in body", encoded(message()),
         with_headers(nested_table(5000))),
    Case("100 KB of headers, invalid body", INVALID, with_headers(HUGE_HEADERS),
         dead="body: must not be empty; its original headers were left out"),
    Case("non-UTF-8 header name and value, invalid body", INVALID, with_headers(NON_UTF8),
         dead="body: must not be empty"),
    Case("timestamp property 2**64-1, invalid body", INVALID,
         pika.BasicProperties(timestamp=2**64 - 1, delivery_mode=2), dead="body: must not be empty"),
    Case("message_id of non-UTF-8 bytes, no id", VALID_NO_ID,
         with_headers(table(), message_id=b"\xff\xfe\x00id"),
         stored_id=derive_id(None, b"\xff\xfe\x00id")),  # its bytes, hashed
    Case("message_id of 255 characters, no id", VALID_NO_ID,
         pika.BasicProperties(message_id="m" * 255, delivery_mode=2),
         stored_id=derive_id("m" * 255, VALID_NO_ID)),
    Case("message_id not a UUID, invalid body", INVALID,
         pika.BasicProperties(message_id="42", delivery_mode=2), dead="body: must not be empty"),
    # Bodies.
    Case("empty body", b"", dead="message: not valid JSON"),
    Case("not UTF-8", b'{"body": "\xff\xfe", "sms": {}}', dead="message: not UTF-8 text"),
    Case("UTF-16 with a BOM", "\ufeff{}".encode("utf-16"), dead="message: not UTF-8 text"),
    Case("JSON null", b"null", dead="message: must be a JSON object, got null"),
    Case("JSON array", b"[1, 2]", dead="message: must be a JSON object, got an array"),
    Case("NaN body", b'{"body": NaN, "sms": {"to_phone_number": "+14155550123"}}',
         dead="body: NaN is not a number JSON can carry"),
    Case("Infinity user_id", encoded(message()).replace(b'"id"', b'"user_id": Infinity, "id"'),
         dead="user_id: Infinity is not a number JSON can carry"),
    Case("1e400 title", encoded(message()).replace(b'"id"', b'"title": 1e400, "id"'),
         dead="title: 1e400 is not a number JSON can carry"),
    Case("a key given twice", encoded(message()).replace(b'"id"', b'"body" : "first", "id"'),
         dead="body: given twice"),
    Case("NUL in the body", encoded(message(body="a\0b")), dead="body: contains a NUL character"),
    Case("lone surrogate", encoded(message()).replace(b'odd but fine', b'\\ud800'),
         dead="message: not valid JSON"),
    Case("nested 100000 deep", b'{"body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         dead="message: not valid JSON (recursion limit exceeded"),
    Case("phone number of 200 digits", encoded(message()).replace(
        b'"+14155550123"', b"1" * 200), dead="sms.to_phone_number: at most 64 characters, got 200"),
    Case("body a number of 200 digits", encoded(message()).replace(b'"odd but fine"', b"7" * 200)),
    Case("id of a megabyte", encoded(message(id="x" * 2**20)), dead="id: must be a UUID"),
    Case("user_id of a megabyte", encoded(message(user_id="u" * 2**20))),
    Case("body of 1600 emoji", encoded(message(body="\U0001F600" * 1600))),
    Case("body of 1600 skin-toned emoji", encoded(message(body="\U0001F44D\U0001F3FD" * 800))),
    Case("body of 1601 emoji", encoded(message(body="\U0001F600" * 1601)),
         dead="body: at most 1600 characters, got 1601"),
    Case("expiry after 9999 in UTC", encoded(message(expire_datetime="9999-12-31T23:00:00-05:00")),
         dead="expire_datetime: must lie between 0001-01-02 and 9999-12-30 in UTC"),
    Case("publish time before year 1 in UTC",
         encoded(message(publish_datetime="0001-01-01T00:30:00+01:00")),
         dead="publish_datetime: must lie between 0001-01-02 and 9999-12-30 in UTC"),
    Case("publish time a unix time beyond 9999", encoded(message(publish_datetime=1e30)),
         dead="publish_datetime: not a valid time"),
    Case("publish time on the first day allowed",
         encoded(message(publish_datetime="0001-01-02T00:00:00Z"))),
    Case("expiry on the last day allowed", encoded(message(expire_datetime="9999-12-30T23:59:59Z"))),
    Case("publish time on the last day allowed",
         encoded(message(publish_datetime="9999-12-30T23:59:59Z"))),
    Case("11 media in all", encoded(message(sms={"to_phone_number": TO, "media_url": [
        "https://example.com/a.png"] * 10, "temporary_media": {
            "name": "a.png", "content_type": "image/png", "content_base64": "iVBORw0KGgo="}})),
         dead="sms.temporary_media: at most 10 media in all"),
    Case("media URL with a port out of range", encoded(message(sms={
        "to_phone_number": TO, "media_url": "https://example.com:99999/a.png"})),
         dead="sms.media_url: not a valid URL"),
    Case("inline media of 6 MB", encoded(message(sms={"to_phone_number": TO, "temporary_media": {
        "name": "a.png", "content_type": "image/png", "content_base64": "A" * 8_000_000}})),
         dead="sms.temporary_media.content_base64: larger than 5 MB"),
    Case("phone number in Arabic-Indic digits", encoded(message(sms={
        "to_phone_number": "+\u0661\u0664\u0661\u0665\u0665\u0665\u0665\u0660\u0661\u0662\u0663"}))),
]


# -- the pipeline: consume, dispatch and the sandbox as processes -----------------------------

@dataclass
class Pipeline:
    settings: Settings
    fake: fake_twilio.FakeTwilioControl
    log_dir: Path
    programs: dict[str, subprocess.Popen] = field(default_factory=dict)
    deaths: list[str] = field(default_factory=list)

    def start(self, name: str) -> None:
        # Dispatch loads times in a session 14 hours ahead of UTC: the last day allowed
        # must still be a time Python holds there.
        extra = {"PGTZ": "Pacific/Kiritimati"} if name == "dispatch" else {}
        self.programs[name] = start_smsq(self.settings, name,
                                         log_path=self.log_dir / f"{name}.log", **extra)

    def restart_the_dead(self) -> None:
        for name, process in self.programs.items():
            if process.poll() is not None:
                self.deaths.append(f"{name} exited {process.returncode}")
                self.start(name)

    def dead_programs(self) -> list[str]:
        return [f"{name} exited {process.returncode}"
                for name, process in self.programs.items() if process.poll() is not None]

    def publish(self, body: bytes, properties: pika.BasicProperties) -> str | None:
        """Publish, confirmed; the broker's reason if it refused the message instead."""
        connection = pika.BlockingConnection(pika.URLParameters(self.settings.amqp_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(self.settings.smsq_exchange, self.settings.smsq_routing_key,
                                  body, properties, mandatory=True)
        except pika.exceptions.ConnectionClosedByBroker as exc:
            return f"{exc.reply_code} {exc.reply_text}"
        finally:
            if connection.is_open:
                connection.close()
        return None

    def sent(self, body: str) -> bool:
        return any(m["body"] == body for m in self.fake.messages(accepted_only=True))

    def log_tail(self) -> str:
        return "\n".join(f"--- {path.name}:\n" + "\n".join(
            path.read_text(errors="replace").splitlines()[-15:])
            for path in sorted(self.log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def database(service_urls, template_database) -> Iterator[str]:
    """One database for the whole module."""
    yield from cloned_database(service_urls[0], template_database)


@pytest.fixture(scope="module")
def pipeline(database, service_urls, tmp_path_factory) -> Iterator[Pipeline]:
    suffix = uuid.uuid4().hex[:10]
    settings = Settings(_env_file=None, database_url=database, amqp_url=service_urls[1],
                        smsq_ingest_batch_ms=20, smsq_exchange=f"test.{suffix}",
                        smsq_queue=f"test.{suffix}.sms")
    sandbox, fake = fake_twilio.spawn()
    settings = dispatch_settings(settings, fake, twilio_sms_rate=200.0, smsq_burst=100)
    declare_queues(settings)
    running = Pipeline(settings, fake, tmp_path_factory.mktemp("hostile"))
    try:
        running.start("consume")
        running.start("dispatch")
        yield running
    finally:
        for process in [*running.programs.values(), sandbox]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)
        _delete_amqp(settings)


def _delete_amqp(settings: Settings) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        for queue in (settings.smsq_queue, settings.dead_queue):
            channel.queue_delete(queue)
        channel.exchange_delete(settings.smsq_exchange)
    finally:
        connection.close()


def stored(settings: Settings, notification_id: uuid.UUID) -> bool:
    with psycopg.connect(settings.database_dsn) as conn:
        return conn.execute("SELECT 1 FROM notification WHERE id = %s",
                            (notification_id,)).fetchone() is not None


def id_of(case: Case) -> uuid.UUID:
    if case.stored_id is not None:
        return case.stored_id
    return uuid.UUID(json.loads(case.body)["id"])


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_an_odd_message_stops_nothing(pipeline, case):
    pipeline.restart_the_dead()
    good = f"good after: {case.name} ({uuid.uuid4().hex[:6]})"
    refused = pipeline.publish(case.body, case.properties)
    assert refused is None or case.broker_may_refuse, f"the broker refused it: {refused}"
    assert pipeline.publish(encoded(message(body=good)), pika.BasicProperties(delivery_mode=2)) is None
    try:
        wait_until(lambda: pipeline.sent(good) or pipeline.dead_programs(), timeout=60,
                   message="the good message sent after the odd one")
    finally:
        print(pipeline.log_tail())
    assert not pipeline.dead_programs(), pipeline.dead_programs()
    assert pipeline.sent(good)
    dead = get_all(pipeline.settings, pipeline.settings.dead_queue)
    if refused:
        print(f"RabbitMQ refused it at publish: {refused}")
        assert not dead
    elif case.dead is None:
        assert not dead, [props.headers.get("x-error") for props, _ in dead]
        assert stored(pipeline.settings, id_of(case))
    else:
        [(props, body)] = dead
        assert body == case.body  # unchanged
        assert case.dead in props.headers["x-error"], props.headers["x-error"]
