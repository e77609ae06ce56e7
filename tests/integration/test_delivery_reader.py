"""The delivery reader: pika's own frames, read back as pika would, and against RabbitMQ."""

from __future__ import annotations

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
