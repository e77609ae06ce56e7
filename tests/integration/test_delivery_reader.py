"""The delivery reader: pika's own frames, read back as pika would, and against RabbitMQ."""

from __future__ import annotations

import logging
import time
import uuid

import pika
import pytest
from hypothesis import given
from hypothesis import settings as settings_of_hypothesis
from hypothesis import strategies as st
from pika import frame, spec

from consumer import amqp
from consumer.ingest.delivery_reader import DeliveryReader, decode_properties
from tests.support import publish_raw, queue_depth, wait_until

OURS, CHANNEL = "smsq-consume-ours", 1


# -- the parser alone, fed pika's own encoding of the frames --------------------------------

class PikaInternals:
    """What the reader needs of a pika connection; records the frames it hands to pika."""

    def __init__(self) -> None:
        self.bytes_received = 0
        self._frame_buffer = b""
        self.to_pika: list = []
        self.dispatch_requests = 0
        self._impl = self
        self.channel_number = CHANNEL

    def _on_data_available(self, data: bytes) -> None:
        raise AssertionError("replaced by the reader")

    def _process_frame(self, value) -> None:
        self.to_pika.append(value)

    def _request_channel_dispatch(self, channel_number: int) -> None:
        assert channel_number == CHANNEL
        self.dispatch_requests += 1


def delivery_frames(tag: str, delivery_tag: int, properties: pika.BasicProperties,
                    body: bytes, channel: int = CHANNEL, frame_max: int = 4096) -> bytes:
    """A delivery as RabbitMQ sends it: the method, the header, the body cut to frame_max."""
    deliver = spec.Basic.Deliver(consumer_tag=tag, delivery_tag=delivery_tag,
                                 redelivered=delivery_tag % 2 == 0, exchange="x",
                                 routing_key="sms")
    parts = [frame.Method(channel, deliver).marshal(),
             frame.Header(channel, len(body), properties).marshal()]
    step = frame_max - 8
    parts += [frame.Body(channel, body[i:i + step]).marshal() for i in range(0, len(body), step)]
    return b"".join(parts)


properties_strategy = st.builds(
    pika.BasicProperties,
    message_id=st.none() | st.text(max_size=20),
    content_type=st.none() | st.just("application/json"),
    headers=st.none() | st.dictionaries(st.text(min_size=1, max_size=5),
                                        st.text(max_size=10), max_size=3),
    delivery_mode=st.none() | st.just(2),
)

# Between deliveries: a heartbeat, a publisher confirm on another channel, a method of our
# channel (Basic.QosOk), or a whole delivery for another consumer of our channel.
other_frames = st.sampled_from([
    frame.Heartbeat().marshal(),
    frame.Method(2, spec.Basic.Ack(delivery_tag=7)).marshal(),
    frame.Method(CHANNEL, spec.Basic.QosOk()).marshal(),
    delivery_frames("someone-else", 99, pika.BasicProperties(), b"not ours"),
])


@settings_of_hypothesis(max_examples=150, deadline=None)
@given(items=st.lists(st.one_of(
    st.tuples(st.just("ours"), st.binary(max_size=10_000), properties_strategy),
    st.tuples(st.just("other"), other_frames)), max_size=25),
    cuts=st.lists(st.integers(min_value=1, max_value=5000), max_size=40))
def test_deliveries_are_read_in_order_however_the_bytes_are_cut(items, cuts):
    stream, expected, expected_to_pika = b"", [], []
    for number, item in enumerate(items, start=1):
        if item[0] == "ours":
            _, body, properties = item
            stream += delivery_frames(OURS, number, properties, body)
            expected.append((number, number % 2 == 0, properties, body))
        else:
            chunk = item[1]
            stream += chunk
            offset = 0
            while offset < len(chunk):
                consumed, value = frame.decode_frame(chunk[offset:])
                expected_to_pika.append(value)
                offset += consumed

    pika_side = PikaInternals()
    reader = DeliveryReader.attach(pika_side, pika_side, OURS)
    position = 0
    for cut in cuts + [len(stream)]:
        pika_side._on_data_available(stream[position:position + cut])
        position += cut
        if position >= len(stream):
            break
    pika_side._on_data_available(stream[position:])

    got = [(tag, redelivered, decode_properties(raw), body)
           for tag, redelivered, raw, body in reader.take()]
    assert [(t, r, b) for t, r, _, b in got] == [(t, r, b) for t, r, _, b in expected]
    for (_, _, decoded, _), (_, _, sent, _) in zip(got, expected):
        assert (decoded.message_id, decoded.content_type, decoded.headers,
                decoded.delivery_mode) == (sent.message_id, sent.content_type,
                                           sent.headers, sent.delivery_mode)
    assert [repr(value) for value in pika_side.to_pika] == [repr(v) for v in expected_to_pika]
    assert pika_side.bytes_received == len(stream)  # what pika's heartbeat checker watches
    # pika's wait ends when, and only when, a delivery of ours was read.
    assert (pika_side.dispatch_requests > 0) == bool(expected)


def test_after_stop_deliveries_go_to_pika_and_one_under_way_is_finished():
    pika_side = PikaInternals()
    reader = DeliveryReader.attach(pika_side, pika_side, OURS)
    first = delivery_frames(OURS, 1, pika.BasicProperties(), b"x" * 10_000)
    pika_side._on_data_available(first[:5000])
    reader.stop()
    pika_side._on_data_available(first[5000:] + delivery_frames(OURS, 2, pika.BasicProperties(),
                                                                 b"late"))
    assert [(tag, body) for tag, _, _, body in reader.take()] == [(1, b"x" * 10_000)]
    assert [type(value).__name__ for value in pika_side.to_pika] == ["Method", "Header", "Body"]


def test_a_broken_frame_end_is_pikas_error():
    pika_side = PikaInternals()
    DeliveryReader.attach(pika_side, pika_side, OURS)
    broken = bytearray(frame.Heartbeat().marshal())
    broken[-1] = 0
    with pytest.raises(pika.exceptions.InvalidFrameError):
        pika_side._on_data_available(bytes(broken))


# -- against RabbitMQ ---------------------------------------------------------------------

def test_reads_what_rabbitmq_delivers_beside_pikas_own_traffic(settings):
    """Bodies of every size (empty, one frame, many frames), properties kept; meanwhile a
    confirmed publish on another channel of the same connection goes through pika."""
    with amqp.connect(settings, "test") as connection:
        channel = connection.channel()
        amqp.declare_topology(channel, settings)
        bodies = [b"", b"small", b"m" * 131_072 * 3 + b"end"]
        properties = pika.BasicProperties(message_id="m-1", headers={"trace": "abc"},
                                          content_type="application/json")
        publish_raw(settings, bodies, properties)
        channel.basic_qos(prefetch_count=10)
        tag = f"test-{uuid.uuid4().hex}"
        reader = DeliveryReader.attach(connection, channel, tag)
        assert reader is not None
        channel.basic_consume(settings.smsq_queue, lambda *_: None, consumer_tag=tag)
        taken = []
        confirmed = connection.channel()
        confirmed.confirm_delivery()
        while len(taken) < len(bodies):
            connection.process_data_events(time_limit=1)
            taken += reader.take()
            confirmed.basic_publish("", settings.dead_queue, b"through pika", mandatory=True)
        assert [body for _, _, _, body in taken] == bodies
        for _, redelivered, raw, _ in taken:
            decoded = decode_properties(raw)
            assert (decoded.message_id, decoded.headers, redelivered) == (
                "m-1", {"trace": "abc"}, False)
        channel.basic_ack(taken[-1][0], multiple=True)

        # Stopped and cancelled: what arrives next is pika's, handed back to the queue.
        publish_raw(settings, [b"after the cancel"])
        reader.stop()
        channel.basic_cancel(tag)
        connection.process_data_events(time_limit=0.5)
        assert reader.take() == []
    wait_until(lambda: queue_depth(settings, settings.smsq_queue) == 1,
               message="the message after the cancel back in the queue")


# -- the pika internals the reader leans on, by what they do (pika is pinned for these) -------

CHECKS = "pika.heartbeat"  # logs each check of the heartbeat checker, at DEBUG
# A reply that never reaches pika leaves a blocking call waiting: these fail at this bound.
internals_timeout = pytest.mark.timeout(60)


def attached_consumer(connection: pika.BlockingConnection, settings):
    """Our channel and consumer with the reader attached; what pika's own callback got."""
    channel = connection.channel()
    amqp.declare_topology(channel, settings)
    tag = f"test-{uuid.uuid4().hex}"
    reader = DeliveryReader.attach(connection, channel, tag)
    assert reader is not None
    to_pika: list[bytes] = []
    channel.basic_consume(settings.smsq_queue, lambda _ch, _m, _p, body: to_pika.append(body),
                          consumer_tag=tag)
    return channel, tag, reader, to_pika


def read_until(connection, reader, count: int, seconds: float = 10) -> list:
    taken: list = []
    deadline = time.monotonic() + seconds
    while len(taken) < count and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
        taken += reader.take()
    return taken


@internals_timeout
def test_pikas_transport_hands_every_read_to_the_reader(settings):
    """The reader replaces `_on_data_available` on the connection object: pika's transport
    must look it up there for each read, so deliveries come through the reader, not pika."""
    with amqp.connect(settings, "test") as connection:
        _channel, _tag, reader, to_pika = attached_consumer(connection, settings)
        bodies = [f"message {n}".encode() for n in range(5)]
        publish_raw(settings, bodies)
        taken = read_until(connection, reader, len(bodies))
        assert [body for _, _, _, body in taken] == bodies
        assert to_pika == []


@internals_timeout
def test_frames_the_reader_passes_on_reach_pika(settings):
    """`_process_frame` still takes a decoded frame and acts on it: another consumer's
    deliveries reach its callback, a publisher confirm on another channel and a
    Basic.Cancel round trip complete, all while the reader is attached."""
    with amqp.connect(settings, "test") as connection:
        channel, tag, reader, to_pika = attached_consumer(connection, settings)
        other_queue = f"{settings.smsq_queue}.other"
        channel.queue_declare(other_queue, exclusive=True)
        to_other: list[bytes] = []
        channel.basic_consume(other_queue, lambda _ch, _m, _p, body: to_other.append(body),
                              auto_ack=True)
        publish_raw(settings, [b"for the other consumer"], exchange="", routing_key=other_queue)
        wait_until(lambda: connection.process_data_events(time_limit=0.2) or to_other,
                   timeout=10, message="the other consumer's delivery, through pika")
        assert to_other == [b"for the other consumer"] and reader.take() == []

        confirmed = connection.channel()
        confirmed.confirm_delivery()
        confirmed.basic_publish("", other_queue, b"confirmed", mandatory=True)
        reader.stop()
        channel.basic_cancel(tag)  # returns once its CancelOk reached pika
        wait_until(lambda: connection.process_data_events(time_limit=0.2) or len(to_other) == 2,
                   timeout=10, message="the confirmed message, through pika")
        assert to_pika == []


@internals_timeout
def test_heartbeats_count_the_bytes_the_reader_reads(settings, caplog):
    """pika's heartbeat checker closes a connection whose `bytes_received` stood still for a
    check interval. With the reader attached every byte passes through it: the connection
    stays open over two checks only if the reader keeps counting them."""
    caplog.set_level(logging.DEBUG, logger=CHECKS)
    [params] = amqp.connection_parameters(settings, "test")  # the one broker of the tests
    params.heartbeat = 1  # the shortest: a check every 6 s (pika adds 5 s to the timeout)
    with pika.BlockingConnection(params) as connection:
        _channel, _tag, reader, _to_pika = attached_consumer(connection, settings)
        caplog.clear()
        checks = []
        give_up = time.monotonic() + 30
        # Two checks after the attach: the first one compares with a count taken before it.
        while len(checks) < 2 and time.monotonic() < give_up:
            publish_raw(settings, [b"keeps coming"])
            connection.process_data_events(time_limit=0.5)
            checks = [r for r in caplog.records if r.name == CHECKS and "idle" in r.getMessage()]
            reader.take()
        assert len(checks) >= 2, "pika's heartbeat checker never ran"
        assert connection.is_open
        assert all(r.getMessage().endswith("idle intervals 0") for r in checks)
